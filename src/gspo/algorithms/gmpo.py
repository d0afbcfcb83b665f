"""GMPO (Zhao et al., Geometric-Mean Policy Optimization, arXiv 2507.20673, eq. 3-4).

GRPO's arithmetic mean of token surrogates becomes a geometric mean: the sequence ratio is
exp(mean_t of the token log-ratios), like GSPO's s_i, but each token's log-ratio is first clipped in log
space (PPO-style, on the side the advantage pushes), with the paper's wide range (e^-0.4, e^0.4): a
geometric mean is far less sensitive to one outlier token than an arithmetic one.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import normaliser, prepare
from gspo.algorithms._masked import masked, per_sequence_mean, seq_mean_token_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def gmpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["gmpo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["gmpo"]["clip_high"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """GMPO loss, minus GMPO eq. 4 (token-level clipping of the log-ratios, then their mean).

    l_{i,t} = logprobs - old_logprobs; clipped to -clip_low when A_i < 0 and l < -clip_low, to clip_high
    when A_i > 0 and l > clip_high (the clipped token gets no gradient), else kept;
    rho_i = exp((1/|y_i|) sum_t l~_{i,t});   loss = -(1/G) sum_i A_i rho_i

    clip_low / clip_high are in log space: the token band is (e^-clip_low, e^clip_high). Gradient: every
    unclipped token of response i gets -(1/G) A_i rho_i / |y_i|. G = `num_sequences`; advantages (B,).
    """
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"{name} must be finite and >= 0 (a log-space bound), got {value}")
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, correction=correction)
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences")

    log_ratio = batch.token_log_ratios()  # (B, T) l_{i,t}
    adv = batch.advantages[:, None]  # (B, 1)
    low = (adv < 0) & (log_ratio < -clip_low) & batch.mask  # (B, T) clipped, gradient 0
    high = (adv > 0) & (log_ratio > clip_high) & batch.mask  # (B, T)
    bound = torch.where(low, torch.full_like(log_ratio, -clip_low), torch.full_like(log_ratio, clip_high))
    clipped_log_ratio = torch.where(low | high, bound, log_ratio)  # (B, T) l~_{i,t}
    ratio = torch.exp(per_sequence_mean(clipped_log_ratio, batch.mask))  # (B,) rho_i
    surrogate = batch.advantages * ratio  # (B,)
    if batch.correction is not None:  # per-response weight: the mean correction weight of its tokens
        surrogate = surrogate * batch.sequence_correction()  # (B,)
    policy = -masked(surrogate, batch.has_tokens).sum() / n

    outside = ((log_ratio < -clip_low) | (log_ratio > clip_high)) & batch.mask  # (B, T)
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=low, clipped_high=high, outside=outside)
    reference = reference_term(batch, kl_estimator, lambda kl: seq_mean_token_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)
