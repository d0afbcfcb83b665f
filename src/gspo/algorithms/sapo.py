"""SAPO (Gao et al., Soft Adaptive Policy Optimization, Qwen, arXiv 2511.20347).

Hard clipping is replaced by a smooth gate of the token ratio, f(r) = sigmoid(tau (r - 1)) * 4 / tau,
whose gradient weight 4 sigma (1 - sigma) equals 1 on-policy and decays smoothly away from r = 1. Negative
advantages get a larger temperature (tau_neg = 1.05 > tau_pos = 1.0, the paper's defaults): their gate
decays faster, because pushing down a token also raises the probability of the many others.
Aggregation as GRPO / GSPO-token: each response's token-mean, then the mean over responses.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import normaliser, prepare
from gspo.algorithms._masked import seq_mean_token_mean
from gspo.algorithms._metrics import _mean, policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def soft_gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """SAPO's gate f(r) = sigmoid(tau (r - 1)) * 4 / tau, elementwise; f(1) = 2 / tau, f'(1) = 1."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def sapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = PAPER_DEFAULTS["sapo"]["tau_pos"],
    tau_neg: float = PAPER_DEFAULTS["sapo"]["tau_neg"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """SAPO loss, minus the SAPO objective with its soft gate.

    r_{i,t} = exp(logprobs - old_logprobs), tau_{i,t} = tau_pos if A_{i,t} > 0 else tau_neg
    loss = -(1/G) sum_i (1/|y_i|) sum_t f(r_{i,t}; tau_{i,t}) A_{i,t},  f(r; tau) = sigmoid(tau (r - 1)) 4 / tau

    Gradient per token: -(1/G) (1/|y_i|) 4 sigma (1 - sigma) r A (sigma = sigmoid(tau (r - 1))): on-policy it
    is the plain policy gradient. G = `num_sequences`. advantages (B,) or (B, T). No hard clip, so the
    clip fractions are 0; `sapo/gate_weight_mean` is the mean gradient weight 4 sigma (1 - sigma) r.
    """
    for name, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not tau > 0.0:
            raise ValueError(f"{name} must be > 0, got {tau}")
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, token_advantages=True,
                    correction=correction)
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences")

    ratio = torch.exp(batch.token_log_ratios())  # (B, T) r_{i,t}
    adv = batch.advantages_per_token()  # (B, T) or (B, 1)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # (B, T) or (B, 1)
    surrogate = soft_gate(ratio, tau) * adv  # (B, T)
    policy = -seq_mean_token_mean(batch.corrected(surrogate), batch.mask, n)

    none = torch.zeros_like(batch.mask)  # (B, T) no hard clip
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=none, clipped_high=none, outside=none)
    with torch.no_grad():
        sigma = torch.sigmoid(tau * (ratio - 1.0))  # (B, T)
        metrics.add("sapo/gate_weight_mean", _mean(4.0 * sigma * (1.0 - sigma) * ratio, batch.mask), "mean/tokens")
    reference = reference_term(batch, kl_estimator, lambda kl: seq_mean_token_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)
