"""Typed output of every objective, and the one numeric safety constant they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# Log-ratios are clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] before `exp`. exp(20) ~ 4.9e8 stays far
# from the float32 / bfloat16 overflow (exp overflows at ~88.7) even after products with advantages and
# sums over a batch, and a ratio that far from 1 is outside any sensible clip band anyway. The only
# branch where the value matters is the unclipped A < 0 one (ratio far above 1): there the clamp caps the
# ratio and zeroes that token's gradient instead of letting one outlier overflow the loss.
MAX_LOG_RATIO = 20.0

# How each metric is reduced across parts of a batch (minibatch slices or processes), see
# `gspo.algorithms.reduce_metrics`. "<op>/<unit>": op in {mean, std, min, max}, unit in {tokens,
# sequences}, weighted by that part's `count/tokens` or `count/sequences`; "sum": plain sum.
REDUCTIONS = ("sum", "mean/tokens", "mean/sequences", "std/tokens", "std/sequences",
              "min/tokens", "min/sequences", "max/tokens", "max/sequences")


@dataclass(frozen=True)
class LossOutput:
    """What every loss returns.

    loss: 0-d tensor carrying the gradient; policy loss + beta * KL term (if a reference was given).
    metrics: detached 0-d float tensors (compute dtype: float32, or float64 for float64 inputs), keys
        namespaced with "/" (listed in docs/objectives.md). Means are over *this call's* response
        tokens or responses; `count/tokens` and `count/sequences` give the weights.
    reductions: metric key -> how to combine it across parts exactly (one of REDUCTIONS).
    """

    loss: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    reductions: Mapping[str, str] = field(default_factory=dict)
