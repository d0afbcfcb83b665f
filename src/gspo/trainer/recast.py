"""Autocast's weight casts, not kept for the backward: each is cast again from the float32 weight when needed.

Under bfloat16 autocast every linear layer multiplies by a bfloat16 cast of its float32 weight, and autograd
keeps that cast until the layer's backward (it needs it for the input's gradient, ``dL/dx = dL/dy W``). Kept,
the casts of all layers are alive together from the end of the forward to the start of the backward: exactly
the step's memory peak, with every activation held (0.88 GB for the Qwen3-0.6B shape's layers, 13.9 GB for
Qwen3-8B's). :func:`recast_weights` saves such a cast as a recipe instead (the float32 weight, the dtype,
transposed or not), and the backward casts it again when the layer's gradient needs it: the same values bit
for bit (a cast is deterministic), one cast alive at a time, for one more cast of every weight per backward
(the 0.6B shape's layers: ~2.6 GB of memory traffic, ~0.1 s at a 2-core CPU's ~27 GB/s; not timed on its
own: the step it shipped with got faster for other reasons, docs/memory.md). With it the autocast context
runs with its cache off (``cache_enabled=False``), so that the forward does not keep every cast until it
ends either (:func:`autocast`).

A saved tensor is taken for a cast of a weight when autograd made it from a leaf that requires grad
(``ToCopyBackward0`` over ``AccumulateGrad``), directly or through ``F.linear``'s transpose (``TBackward0``), in
another dtype. Everything else is saved as it is: a frozen weight (LoRA's base, whose cast has no autograd
history), FSDP2's gathered weights (already in the compute dtype), activations.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


class _Recast(NamedTuple):
    weight: torch.Tensor  # the float32 leaf (the parameter itself: no copy)
    dtype: torch.dtype
    transposed: bool


def _pack(saved: torch.Tensor):
    node, transposed = saved.grad_fn, False
    if node is not None and node.name() == "TBackward0":  # F.linear saves weight.t()
        node, transposed = node.next_functions[0][0], True
    if node is None or node.name() != "ToCopyBackward0":
        return saved
    leaf = node.next_functions[0][0]
    weight = getattr(leaf, "variable", None)  # AccumulateGrad's parameter
    if weight is None or weight.dtype == saved.dtype or weight.dim() != 2:
        return saved
    if saved.shape != (weight.shape[::-1] if transposed else weight.shape):
        return saved
    return _Recast(weight, saved.dtype, transposed)


def _unpack(packed):
    if isinstance(packed, _Recast):
        cast = packed.weight.to(packed.dtype)
        return cast.t() if packed.transposed else cast
    return packed


def recast_weights() -> contextlib.AbstractContextManager:
    """Around a forward whose backward comes later: weight casts saved for the backward are recast there."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype`` (off for None) without its weight cache: a no-grad pass then holds one
    layer's casts at a time instead of the whole model's, and a forward with :func:`recast_weights` keeps
    none for its backward."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)
