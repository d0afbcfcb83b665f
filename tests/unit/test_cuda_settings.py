"""CUDA-only process settings (gspo.cuda_settings): the decisions, testable without a GPU."""

from __future__ import annotations

import os

import torch

from gspo import cuda_settings
from gspo.cuda_settings import EXPANDABLE_SEGMENTS, allocator_setting, releases_cache
from gspo.logprobs import DEFAULT_CHUNK_TOKENS, GPU_CHUNK_TOKENS, default_chunk_tokens


def test_expandable_segments_only_on_cuda_before_it_initialises_and_never_over_the_user_s_setting():
    assert allocator_setting({}, cuda_available=True, cuda_initialised=False) == EXPANDABLE_SEGMENTS
    assert allocator_setting({}, cuda_available=False, cuda_initialised=False) is None  # a CPU run
    assert allocator_setting({}, cuda_available=True, cuda_initialised=True) is None  # too late to take effect
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's configuration stays
        assert allocator_setting({name: "max_split_size_mb:512"}, cuda_available=True, cuda_initialised=False) is None


def test_configure_allocator_sets_nothing_on_this_cpu(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # restored (removed) after the test, whatever it sets
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_settings.configure_allocator() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine before its first tensor
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert cuda_settings.configure_allocator() == EXPANDABLE_SEGMENTS
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS


def test_cached_memory_is_released_between_phases_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    assert releases_cache(torch.device("cuda", 0)) and not releases_cache(torch.device("cpu"))
    cuda_settings.release_cached_memory(torch.device("cpu"))
    assert calls == []
    cuda_settings.release_cached_memory(torch.device("cuda"))
    assert calls == [1]


def test_tf32_is_applied_only_when_the_policy_chose_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    cuda_settings.apply_matmul_precision(False)
    assert calls == []
    cuda_settings.apply_matmul_precision(True)
    assert calls == ["high"]


def test_the_lm_head_takes_larger_chunks_on_a_gpu():
    assert default_chunk_tokens(torch.device("cuda", 0)) == GPU_CHUNK_TOKENS > DEFAULT_CHUNK_TOKENS
    assert default_chunk_tokens(torch.device("cpu")) == DEFAULT_CHUNK_TOKENS
