"""Diagnostics every objective reports, and their exact reduction across parts of a batch.

Each metric is a detached 0-d tensor: a mean (or std, min, max) over *this call's* response tokens or
responses, or a sum (loss terms, counts). `LossOutput.reductions` says which, so `reduce_metrics`
can combine parts (minibatch slices, processes) into exactly the whole batch's values. Stds are
population stds (ddof = 0) so that they pool exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from gspo.algorithms._inputs import PolicyBatch
from gspo.algorithms._masked import masked
from gspo.algorithms.types import LossOutput


def _count(select: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return select.sum().to(dtype)


def _mean(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    return masked(values, select).sum() / _count(select, values.dtype).clamp_min(1)


def _std(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    deviation = masked(values - _mean(values, select), select)
    return (deviation.square().sum() / _count(select, values.dtype).clamp_min(1)).sqrt()


def _extreme(values: torch.Tensor, select: torch.Tensor, *, largest: bool, empty: float) -> torch.Tensor:
    """min or max over the selection; `empty` if nothing is selected (that part then weighs 0)."""
    fill = float("-inf") if largest else float("inf")
    picked = masked(values, select, fill)
    value = picked.amax() if largest else picked.amin()
    return torch.where(select.any(), value, torch.full_like(value, empty))


class MetricsBuilder:
    """Collects (key, detached value, reduction) triples and produces the LossOutput."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.metrics: dict[str, torch.Tensor] = {}
        self.reductions: dict[str, str] = {}

    def add(self, key: str, value: torch.Tensor, reduction: str) -> None:
        self.metrics[key] = value.detach().to(self.dtype)
        self.reductions[key] = reduction

    def finish(
        self,
        batch: PolicyBatch,
        policy: torch.Tensor,
        reference: tuple[torch.Tensor, torch.Tensor] | None,
        beta: float,
    ) -> LossOutput:
        """loss = policy + beta * KL term (if a reference was given); records both terms."""
        loss = policy
        self.add("loss/policy", policy, "sum")
        if reference is not None:
            kl_term, per_token = reference
            loss = policy + beta * kl_term
            self.add("loss/kl", kl_term, "sum")
            self.add("kl/ref", _mean(per_token, batch.mask), "mean/tokens")
        return LossOutput(loss=loss, metrics=self.metrics, reductions=self.reductions)


@torch.no_grad()
def policy_metrics(
    batch: PolicyBatch,
    *,
    ratio: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    outside: torch.Tensor,
) -> MetricsBuilder:
    """The metrics shared by every objective.

    ratio: the ratio the loss uses, (B,) per response (GSPO) or (B, T) per token (GRPO, DAPO).
    clipped_low / clipped_high: (B, T) bool, tokens whose gradient the clip zeroes (lower / upper side).
    outside: (B, T) bool, tokens whose ratio lies outside the clip band, whatever the advantage's sign.
    """
    tokens, sequences = batch.mask, batch.has_tokens  # (B, T), (B,)
    m = MetricsBuilder(batch.logprobs.dtype)
    m.add("count/tokens", _count(tokens, m.dtype), "sum")
    m.add("count/sequences", _count(sequences, m.dtype), "sum")
    if batch.out_of_support is not None:
        m.add("count/out_of_support_tokens", batch.out_of_support, "sum")
    flags = {"loss/clip_frac": clipped_low | clipped_high, "loss/clip_frac_low": clipped_low,
             "loss/clip_frac_high": clipped_high, "ratio/outside_band_frac": outside}
    for key, flag in flags.items():
        m.add(key, _mean(flag.to(m.dtype), tokens), "mean/tokens")

    unit, select = ("tokens", tokens) if ratio.dim() == 2 else ("sequences", sequences)
    m.add("ratio/mean", _mean(ratio, select), f"mean/{unit}")
    m.add("ratio/min", _extreme(ratio, select, largest=False, empty=1.0), f"min/{unit}")
    m.add("ratio/max", _extreme(ratio, select, largest=True, empty=1.0), f"max/{unit}")

    token_lr, seq_lr = batch.token_log_ratios(), batch.sequence_log_ratios()  # (B, T), (B,)
    m.add("logratio/token_mean", _mean(token_lr, tokens), "mean/tokens")
    m.add("logratio/token_std", _std(token_lr, tokens), "std/tokens")
    m.add("logratio/seq_mean", _mean(seq_lr, sequences), "mean/sequences")
    m.add("logratio/seq_std", _std(seq_lr, sequences), "std/sequences")
    # k3 estimate of KL(pi_old || pi_theta) from tokens sampled by pi_old: r - 1 - log r, r = pi_theta / pi_old.
    m.add("kl/old_new", _mean(torch.expm1(token_lr) - token_lr, tokens), "mean/tokens")
    return m


def reduce_metrics(
    parts: Sequence[Mapping[str, torch.Tensor | float]], reductions: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Combine the metrics of several parts of one batch into the whole batch's metrics, exactly.

    parts: the `.metrics` of each part (tensors or floats, e.g. gathered from every process).
    reductions: the `.reductions` of any one of them (the same for every call of one loss).
    Returns float64 0-d tensors. Loss terms and counts are summed (correct when every part was given
    the global normaliser); means are weighted by the parts' counts; stds are pooled; min / max skip
    parts that had nothing to measure.
    """
    if not parts:
        raise ValueError("reduce_metrics needs at least one part")

    def column(key: str) -> torch.Tensor:
        return torch.tensor([float(part[key]) for part in parts], dtype=torch.float64)

    weights = {"tokens": column("count/tokens"), "sequences": column("count/sequences")}
    out: dict[str, torch.Tensor] = {}
    for key, how in reductions.items():
        values = column(key)
        if how == "sum":
            out[key] = values.sum()
            continue
        op, unit = how.split("/")
        w = weights[unit]
        total = w.sum().clamp_min(1)
        if op == "mean":
            out[key] = (w * values).sum() / total
        elif op == "std":
            means = column(key.removesuffix("_std") + "_mean")
            mean = (w * means).sum() / total
            out[key] = ((w * (values.square() + (means - mean).square())).sum() / total).sqrt()
        else:
            kept = values[w > 0] if bool((w > 0).any()) else values[:1]
            out[key] = kept.max() if op == "max" else kept.min()
    return out
