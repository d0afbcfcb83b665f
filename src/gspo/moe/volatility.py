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
    a, b = _stack(routing_a), _stack(routing_b)  # (L, B, S, k) each
    if a.shape != b.shape:
        raise ValueError(f"routings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (L, B, S, k)")
    kept = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(dim=-1)  # (L, B, S, k): a's expert is also in b
    return 1.0 - kept.float().mean(dim=-1)  # (L, B, S)


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


def _stack(routing: Any) -> torch.Tensor:
    """``(L, B, S, k)`` from a RoutingRecord or a sequence of ``(B, S, k)`` tensors."""
    layers: Sequence[torch.Tensor] = getattr(routing, "indices", routing)
    if len(layers) == 0:
        raise ValueError("routing has no MoE layers")
    return torch.stack(list(layers))
