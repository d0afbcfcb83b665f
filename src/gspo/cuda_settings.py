"""Process-wide CUDA settings for training: each one a pure decision, then its application; none on a CPU.

- **Allocator.** ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` when the user set no allocator
  configuration and CUDA has not initialised yet (it is read then): micro-batches of varying length
  beside a fixed vLLM pool otherwise fragment the caching allocator (PyTorch's CUDA semantics notes,
  "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF"). vLLM's sleep-mode pool turns it off around
  its own allocations. Set in the environment, so torchrun's and the sampler's child processes inherit it.
- **Cached blocks released between rollout and update** (``torch.cuda.empty_cache``): the sampler's KV
  cache and the update's activations differ in shape, and a colocated engine needs the memory back.
- **TF32 matmuls** for float32 compute on a GPU with them: the precision policy decides
  (:attr:`gspo.precision.PrecisionPolicy.tf32`), :func:`apply_matmul_precision` applies it.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the CUDA name, and torch's newer generic one
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def allocator_setting(environ: Mapping[str, str], *, cuda_available: bool, cuda_initialised: bool) -> str | None:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` value to set, or None: no CUDA, CUDA already initialised (too late:
    the allocator has read its configuration), or the user configured the allocator (theirs is kept)."""
    if not cuda_available or cuda_initialised or any(environ.get(name) for name in ALLOC_CONF_VARS):
        return None
    return EXPANDABLE_SEGMENTS


def configure_allocator() -> str | None:
    """Apply :func:`allocator_setting` to this process's environment; returns what was set (None: nothing)."""
    value = allocator_setting(os.environ, cuda_available=torch.cuda.is_available(),
                              cuda_initialised=torch.cuda.is_initialized())
    if value is not None:
        os.environ[ALLOC_CONF_VARS[0]] = value
    return value


def releases_cache(device: torch.device) -> bool:
    """Whether the caching allocator's free blocks are handed back between phases on ``device``: CUDA only."""
    return device.type == "cuda"


def release_cached_memory(device: torch.device) -> None:
    """``torch.cuda.empty_cache()`` on a CUDA device (between the rollout and the update); nothing elsewhere."""
    if releases_cache(device):
        torch.cuda.empty_cache()


def apply_matmul_precision(tf32: bool) -> None:
    """TF32 for float32 matmuls when the precision policy chose it (``torch.set_float32_matmul_precision``);
    PyTorch's default (``highest``, no TF32) is left alone otherwise."""
    if tf32:
        torch.set_float32_matmul_precision("high")
