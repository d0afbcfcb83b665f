"""LUSPO (Liu et al., Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261).

GSPO with each response's clipped sequence surrogate multiplied by its length |y_i|. GSPO's gradient per
token is s_i A_i / |y_i| (eq. 10), so a response's total push does not grow with its length and, with
many clipped negatives, training drifts towards short answers; the |y_i| factor restores a per-token
gradient s_i A_i (each token of a response counts like a token, the sequence ratio and its clip stay
GSPO's). Normaliser: the number of responses, as GSPO (the per-response token-sum, then the mean
over responses). Clip ranges: GSPO's 3e-4 / 4e-4. The gradient scale grows with the mean response length,
so a learning rate tuned for GSPO may need lowering.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import check_clip, normaliser, prepare
from gspo.algorithms._masked import clip_indicators, clipped_surrogate, masked
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def luspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["luspo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["luspo"]["clip_high"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """LUSPO loss: GSPO's sequence surrogate weighted by the response length.

    s_i = exp((1/|y_i|) sum_t (logprobs - old_logprobs)[i, t])   (GSPO eq. 7)
    loss = -(1/G) sum_i |y_i| min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

    Gradient: every token of response i gets -(1/G) s_i A_i while unclipped, 0 once clipped.
    G = `num_sequences`; advantages (B,). The optional KL term is aggregated the same way (token-sum per
    response, mean over responses).
    """
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, correction=correction)
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences")

    ratio = torch.exp(batch.sequence_log_ratios())  # (B,) s_i
    surrogate = batch.lengths * clipped_surrogate(ratio, batch.advantages, clip_low, clip_high)  # (B,)
    if batch.correction is not None:  # per-response weight: the mean correction weight of its tokens
        surrogate = surrogate * batch.sequence_correction()  # (B,)
    policy = -masked(surrogate, batch.has_tokens).sum() / n

    low, high, outside = clip_indicators(ratio, batch.advantages, clip_low, clip_high)  # (B,) each
    per_token = [(flag & batch.has_tokens)[:, None].expand_as(batch.mask) for flag in (low, high, outside)]
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=per_token[0], clipped_high=per_token[1],
                             outside=per_token[2])
    seq_clipped = ((low | high) & batch.has_tokens).to(ratio.dtype)  # (B,)
    metrics.add("loss/seq_clip_frac", seq_clipped.sum() / batch.sequence_count.clamp_min(1), "mean/sequences")
    reference = reference_term(batch, kl_estimator, lambda kl: masked(kl, batch.mask).sum() / n)
    return metrics.finish(batch, policy, reference, beta)
