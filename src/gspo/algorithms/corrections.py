"""Rollout corrections: weights for the gap between the rollout engine's policy and the trainer's pi_old.

Three probability channels stay apart: `logprobs` (pi_theta, being trained), `old_logprobs` (pi_old, the
anchor of each loss's ratio and clip) and `rollout_logprobs` (pi_rollout, what the engine actually sampled
from: other kernels, precision, MoE routing). A correction is a separate detached factor per token,
passed to any loss as `correction=`; it never replaces pi_old silently. With the per-token ratio
r_t = pi_old(y_t) / pi_rollout(y_t) = exp(old_logprobs - rollout_logprobs):

  none        w_t = 1
  bypass      w_t = 1, and the trainer passes rollout_logprobs *as* old_logprobs (no recomputation of pi_old;
              GSPO paper section 5.4); only the metrics are computed here
  tis         w_t = min(r_t, threshold)                    truncated IS (Yao et al., "Your efficient RL
                                                           framework secretly brings you off-policy RL
                                                           training", 2025), threshold 2
  mis         w_t = r_t if low <= r_t <= high else 0       masked IS / IcePop (Ling team, Ring-1T,
                                                           arXiv 2510.18855), band [0.5, 5]
  seq_tis     w_i = min(prod_t r_t, threshold)             sequence-level TIS, product form, threshold 2
  seq_mis     w_i = prod_t r_t if in [low, high] else 0    sequence-level MIS, band [0.5, 2]
  geo_tis     w_i = min(g_i, threshold)                    g_i = exp(mean_t log r_t), the length-normalised
                                                           (geometric-mean) sequence ratio, threshold 2
  geo_mis     w_i = g_i if g_i in [low, high] else 0       band [0.99, 1.01]
  geo_reject  w_i = 1 if g_i in [low, high] else 0         geometric rejection, no reweighting, [0.99, 1.01]
  opsm        w_{i,t} = 0 if A_{i,t} < 0 and (1/|y_i|) sum_t (rollout_logprobs - logprobs) > delta, else 1
              Off-Policy Sequence Masking (DeepSeek-V3.2, arXiv 2512.02556): drop negative-advantage
              responses the current policy has drifted far from; delta 1e-4. Needs `logprobs` (taken
              detached) and `advantages`, so it is recomputed at every micro-step.

Sequence-level weights are broadcast to every token of the response. The product form is the right
quantity for this job (docs/objectives.md misreading 1 is about the GSPO ratio, not about corrections); the geometric
form is its length-normalised, far less extreme, variant. The band and threshold defaults of the geometric
modes are this library's choice (no paper fixes them). Every threshold a mode does not use is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from gspo.algorithms._inputs import as_bool_mask
from gspo.algorithms._masked import clamp_log_ratio, compute_dtype, in_support, masked, per_sequence_mean
from gspo.algorithms._metrics import MetricsBuilder, _count, _mean, _std
from gspo.algorithms.catalogue import CORRECTION_DEFAULTS, CORRECTION_MODES



@dataclass(frozen=True)
class Correction:
    """Per-token correction weights and their diagnostics.

    weights: (B, T) detached, >= 0, 0 on padding and on dropped tokens; pass as a loss's `correction=`.
    metrics: detached 0-d tensors, keys `correction/...` plus `count/tokens`, `count/sequences`.
    reductions: how each metric combines across parts (see `reduce_metrics`).
    """

    weights: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    reductions: Mapping[str, str] = field(default_factory=dict)


def _resolve(mode: str, given: Mapping[str, float | None]) -> dict[str, float]:
    if mode not in CORRECTION_MODES:
        raise ValueError(f"correction mode must be one of {CORRECTION_MODES}, got {mode!r}")
    allowed = CORRECTION_DEFAULTS[mode]
    extra = [k for k, v in given.items() if v is not None and k not in allowed]
    if extra:
        raise ValueError(f"correction mode {mode!r} takes {sorted(allowed) or 'no thresholds'}, not {extra}")
    values = {k: float(given[k]) if given.get(k) is not None else v for k, v in allowed.items()}
    for k, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"correction {k} must be finite and >= 0, got {v}")
    if "threshold" in values and values["threshold"] <= 0:
        raise ValueError(f"correction threshold must be > 0, got {values['threshold']}")
    if "low" in values and not values["low"] <= values["high"]:
        raise ValueError(f"correction needs low <= high, got low={values['low']}, high={values['high']}")
    return values


def _in_band(x: torch.Tensor, v: Mapping[str, float]) -> torch.Tensor:
    return (x >= v["low"]) & (x <= v["high"])


@torch.no_grad()
def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    logprobs: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    threshold: float | None = None,
    low: float | None = None,
    high: float | None = None,
    delta: float | None = None,
) -> Correction:
    """The correction weights of `mode` (see the module docstring) for (B, T) log-probabilities.

    old_logprobs, rollout_logprobs, mask: (B, T); logprobs (B, T) and advantages (B,) or (B, T): only
    for "opsm" (an error otherwise). Thresholds left at None take the mode's default
    (`CORRECTION_DEFAULTS`). Padding may hold anything (inf, NaN): it is replaced with `where`. A token
    whose `old_logprobs`, `rollout_logprobs` or `logprobs` is -inf (outside a top-k / top-p support, see
    `in_support`) gets weight 0 and is left out of the metrics and of its response's sequence ratio.
    """
    values = _resolve(mode, {"threshold": threshold, "low": low, "high": high, "delta": delta})
    if (logprobs is not None or advantages is not None) != (mode == "opsm"):
        raise ValueError("logprobs and advantages are inputs of mode 'opsm' only" if mode != "opsm"
                         else "mode 'opsm' needs logprobs (current policy) and advantages")
    shape = old_logprobs.shape
    for name, t in (("rollout_logprobs", rollout_logprobs), ("mask", mask), ("logprobs", logprobs)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, old_logprobs {tuple(shape)}; both must be (B, T)")
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs must be (B, T), got shape {tuple(shape)}")
    mask = in_support(as_bool_mask(mask), old_logprobs, rollout_logprobs, logprobs)  # (B, T)
    dtype = compute_dtype(old_logprobs, rollout_logprobs, logprobs)
    log_ratio = clamp_log_ratio(masked(old_logprobs.to(dtype) - rollout_logprobs.to(dtype), mask))  # (B, T) log r_t
    if mode == "opsm":
        weights = _opsm(log_ratio, rollout_logprobs, logprobs, advantages, mask, values["delta"], dtype)
        truncated = torch.zeros_like(mask)  # (B, T)
    else:
        weights, truncated = _ratio_weights(mode, log_ratio, mask, values)
    weights = masked(weights, mask)  # (B, T)
    return Correction(weights=weights, **_metrics(weights, log_ratio, truncated, mask))


def _ratio_weights(mode: str, log_ratio: torch.Tensor, mask: torch.Tensor,
                   values: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) weights of the ratio-based modes and (B, T) bool, where the weight was truncated."""
    truncated = torch.zeros_like(mask)  # (B, T)
    if mode in ("none", "bypass"):
        return torch.ones_like(log_ratio), truncated
    if mode in ("tis", "mis"):
        ratio = torch.exp(log_ratio)  # (B, T) r_t
        if mode == "tis":
            return ratio.clamp(max=values["threshold"]), (ratio > values["threshold"]) & mask
        return torch.where(_in_band(ratio, values), ratio, torch.zeros_like(ratio)), truncated
    seq_log = log_ratio.sum(-1) if mode.startswith("seq") else per_sequence_mean(log_ratio, mask)  # (B,)
    seq_ratio = torch.exp(clamp_log_ratio(seq_log))  # (B,) prod_t r_t or g_i
    if mode.endswith("tis"):
        truncated = (seq_ratio > values["threshold"])[:, None] & mask
        seq_w = seq_ratio.clamp(max=values["threshold"])
    else:
        kept_value = torch.ones_like(seq_ratio) if mode == "geo_reject" else seq_ratio
        seq_w = torch.where(_in_band(seq_ratio, values), kept_value, torch.zeros_like(seq_ratio))
    return seq_w[:, None].expand_as(log_ratio), truncated


def _opsm(log_ratio, rollout_logprobs, logprobs, advantages, mask, delta, dtype) -> torch.Tensor:
    """(B, T) OPSM weights: 0 on negative-advantage tokens of responses whose mean
    log(pi_rollout / pi_theta) exceeds delta, 1 elsewhere on the response."""
    b = mask.shape[0]
    if advantages.shape not in ((b,), tuple(mask.shape)):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({b},) or {tuple(mask.shape)}")
    drift = per_sequence_mean(masked(rollout_logprobs.to(dtype) - logprobs.detach().to(dtype), mask), mask)  # (B,)
    adv = advantages.detach().to(dtype)
    adv = masked(adv, mask) if adv.dim() == 2 else masked(adv, mask.any(-1))[:, None]  # (B, T) or (B, 1)
    drop = (adv < 0) & (drift > delta)[:, None]  # (B, T) or (B, 1)
    return torch.where(drop, torch.zeros_like(log_ratio), torch.ones_like(log_ratio))


def _metrics(weights, log_ratio, truncated, mask) -> dict:
    sequences = mask.any(-1)  # (B,)
    m = MetricsBuilder(weights.dtype)
    m.add("count/tokens", _count(mask, m.dtype), "sum")
    m.add("count/sequences", _count(sequences, m.dtype), "sum")
    m.add("correction/weight_mean", _mean(weights, mask), "mean/tokens")
    m.add("correction/weight_std", _std(weights, mask), "std/tokens")
    m.add("correction/masked_frac", _mean(((weights == 0) & mask).to(m.dtype), mask), "mean/tokens")
    m.add("correction/truncated_frac", _mean(truncated.to(m.dtype), mask), "mean/tokens")
    dropped = sequences & ~((weights > 0) & mask).any(-1)  # (B,) every token dropped
    m.add("correction/seq_masked_frac", _mean(dropped.to(m.dtype), sequences), "mean/sequences")
    m.add("correction/logratio_mean", _mean(log_ratio, mask), "mean/tokens")  # log pi_old / pi_rollout
    # k3 estimate of KL(pi_rollout || pi_old) from tokens sampled by pi_rollout: r - 1 - log r.
    m.add("correction/kl_rollout_old", _mean(torch.expm1(log_ratio) - log_ratio, mask), "mean/tokens")
    return {"metrics": m.metrics, "reductions": m.reductions}
