"""The weight push to vLLM (G19.2): each tensor cast to the engine's dtype as it is sent, one at a time, and
the metadata vLLM's NCCL transfer sizes its buffers from agrees with the stream without gathering."""

from __future__ import annotations

import gc
import weakref

import torch

from gspo.rollout.vllm.weights import engine_weight_metadata, engine_weights


def tiny_model() -> torch.nn.Module:
    from gspo.models.load import EMBEDDED, load_model

    return load_model(EMBEDDED["tiny-arith"], dtype=torch.float32, device=torch.device("cpu"))


class FakeEngine:
    """Loads a weight stream as vLLM's ``reload_weights`` does (one tensor, then the next), recording every
    dtype and, before each load, how many earlier tensors the stream still keeps alive."""

    def __init__(self) -> None:
        self.dtypes, self.names, self.alive_before = [], [], []

    def load(self, weights) -> None:
        earlier = []
        for name, tensor in weights:
            gc.collect()
            self.alive_before.append(sum(ref() is not None for ref in earlier))
            self.names.append(name)
            self.dtypes.append(tensor.dtype)
            # a view of a cast tensor (tied names) keeps only that tensor: track the storage's owner
            earlier.append(weakref.ref(tensor._base if tensor._base is not None else tensor))
            del tensor


def test_a_bfloat16_engine_gets_bfloat16_tensors_one_at_a_time():
    model = tiny_model()
    engine = FakeEngine()
    engine.load(engine_weights(model, torch.bfloat16))
    assert set(engine.dtypes) == {torch.bfloat16}  # no float32 tensor reaches a bfloat16 engine
    # streaming: at most one earlier cast tensor is alive (the one a tied second name shares), never the model
    assert max(engine.alive_before) <= 1, engine.alive_before
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy is untouched
    pushed = dict(engine_weights(model, torch.bfloat16))
    for name, p in model.named_parameters():
        assert torch.equal(pushed[name], p.detach().to(torch.bfloat16))


def test_the_same_dtype_is_not_copied():
    model = tiny_model()
    first_name, first = next(iter(engine_weights(model, torch.float32)))
    assert first.data_ptr() == dict(model.named_parameters())[first_name].data_ptr()


def test_metadata_matches_the_stream_without_materialising():
    model = tiny_model()
    meta = engine_weight_metadata(model, torch.bfloat16)
    assert meta == [(n, t.dtype, tuple(t.shape)) for n, t in engine_weights(model, torch.bfloat16)]
    assert "lm_head.weight" in {name for name, _, _ in meta}  # tied: both names


def test_lora_metadata_and_cast_stream_match_the_merged_model():
    """LoRA: the merged weights stream in the engine's dtype, and the NCCL metadata (meta tensors, no merge)
    names the same tensors with the same shapes."""
    import pytest

    pytest.importorskip("peft")
    from gspo.config.schema import LoraConfig
    from gspo.models.load import EMBEDDED
    from gspo.models.lora import apply_lora, merged_copy

    model = apply_lora(tiny_model(), LoraConfig(rank=4, alpha=8.0), base_path=EMBEDDED["tiny-arith"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    stream = list(engine_weights(model, torch.bfloat16))
    assert engine_weight_metadata(model, torch.bfloat16) == [(n, t.dtype, tuple(t.shape)) for n, t in stream]
    expected = dict(merged_copy(model).named_parameters(remove_duplicate=False))
    assert {n for n, _ in stream} == expected.keys()
    for name, tensor in stream:
        assert torch.equal(tensor, expected[name].detach().to(torch.bfloat16)), name
