"""KL penalty to a frozen reference policy (DeepSeekMath eq. 4; estimators after Schulman, 2020).

Each loss accepts `ref_logprobs`, `beta` and `kl_estimator` and adds beta * KL aggregated exactly
like its own policy term (same per-response / per-token weighting, same global normaliser), so the
trainer never has to know which aggregation goes with which objective.
"""

from __future__ import annotations

from typing import Callable

import torch

from gspo.algorithms._inputs import PolicyBatch, as_bool_mask
from gspo.algorithms._masked import clamp_log_ratio, compute_dtype, masked
from gspo.algorithms.catalogue import KL_ESTIMATORS


def check_kl_args(ref_logprobs: torch.Tensor | None, beta: float, kl_estimator: str) -> None:
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not beta >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0.0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (the reference policy's log-probabilities)")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on tokens sampled from the policy; (B, T), 0 on padding.

    With d = ref_logprobs - logprobs (clamped to +-MAX_LOG_RATIO):
    k1 = -d = logprobs - ref_logprobs; k2 = d^2 / 2; k3 = exp(d) - d - 1 (>= 0; DeepSeekMath eq. 4).
    The gradient flows to `logprobs` only; `ref_logprobs` is treated as a constant.
    """
    check_kl_args(ref_logprobs, 0.0, estimator)
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
                         f"mask {tuple(mask.shape)} must all have the same (B, T) shape")
    mask = as_bool_mask(mask)  # (B, T)
    dtype = compute_dtype(logprobs, ref_logprobs)
    logprobs = masked(logprobs.to(dtype), mask)  # (B, T)
    ref_logprobs = masked(ref_logprobs.detach().to(dtype), mask)  # (B, T)
    d = clamp_log_ratio(ref_logprobs - logprobs)  # (B, T)
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    else:
        kl = torch.expm1(d) - d  # exp(d) - 1 - d, accurate near d = 0
    return masked(kl, mask)  # (B, T)


def reference_term(
    batch: PolicyBatch, kl_estimator: str, aggregate: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(aggregated KL term, per-token KL (B, T)) with the loss's own `aggregate`, or None without a reference."""
    if batch.ref_logprobs is None:
        return None
    per_token = kl_penalty(batch.logprobs, batch.ref_logprobs, batch.mask, kl_estimator)  # (B, T)
    return aggregate(per_token), per_token
