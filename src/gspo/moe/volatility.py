"""Expert volatility: the share of activated experts that change between two routings (GSPO section 5.3).

The paper motivates Routing Replay with this number: after one gradient update, about 10% of the
experts activated for the same tokens change (48-layer Qwen3-30B-A3B). For a token and an MoE layer
with expert sets ``A`` (before) and ``B`` (after), both of size k::

    v = |A \\ B| / k

averaged over the counted tokens of each layer, then over layers. The order of experts inside a set
does not matter. Pure torch: a routing is a ``RoutingRecord`` (anything with ``.indices``) or a
sequence of per-layer ``(B, S, k)`` index tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def token_volatility(routing_a: Any, routing_b: Any) -> torch.Tensor:
    """``(L, B, S)`` float: for each MoE layer and position, ``|A \\ B| / k``.

    Assumes the k experts of one token are distinct (true of a top-k).
    """
    a, b = _layers(routing_a), _layers(routing_b)  # (B, S, k) per layer each
    shapes = [(len(a), *a[0].shape), (len(b), *b[0].shape)]
    if shapes[0] != shapes[1] or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"routings differ in shape: {shapes[0]} vs {shapes[1]} (L, B, S, k)")
    return torch.stack([_changed_share(x, y) for x, y in zip(a, b)])  # (L, B, S)


def _changed_share(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, S) ``|A \\ B| / k`` of one layer, by binary search of A's experts in sorted B (no k x k tensor)."""
    a, b = a.long(), b.long().sort(dim=-1).values  # (B, S, k) each
    at = torch.searchsorted(b, a).clamp_max(b.shape[-1] - 1)  # (B, S, k) where a's expert would sit in b
    kept = b.gather(-1, at) == a  # (B, S, k): a's expert is also in b
    return 1.0 - kept.float().mean(dim=-1)


def expert_volatility(
    routing_a: Any, routing_b: Any, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of activated experts that differ between two routings of the same tokens.

    ``mask`` ``(B, S)`` bool selects the positions that count (e.g. completion tokens); None counts
    all. Returns ``(mean, per_layer)``: a scalar and an ``(L,)`` tensor. With no counted position
    both are NaN (the share is undefined).
    """
    per_token = token_volatility(routing_a, routing_b)  # (L, B, S)
    if mask is None:
        mask = torch.ones(per_token.shape[1:], dtype=torch.bool, device=per_token.device)
    if mask.shape != per_token.shape[1:]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the routings {tuple(per_token.shape[1:])}")
    weights = mask.to(per_token.device, per_token.dtype)  # (B, S)
    count = weights.sum()
    per_layer = (per_token * weights).sum(dim=(1, 2)) / count  # (L,)
    return per_layer.mean(), per_layer


def _layers(routing: Any) -> Sequence[torch.Tensor]:
    """The ``(B, S, k)`` tensors of a RoutingRecord or a sequence of them."""
    layers: Sequence[torch.Tensor] = getattr(routing, "indices", routing)
    if len(layers) == 0:
        raise ValueError("routing has no MoE layers")
    return list(layers)
