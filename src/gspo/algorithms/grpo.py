"""GRPO loss (Shao et al., DeepSeekMath, arXiv 2402.03300, eq. 1-2 of the GSPO paper).

Token-level ratio and clip, each response's tokens averaged, then the responses ("seq-mean-token-mean").
Optional KL to a reference policy (DeepSeekMath eq. 3-4, k3 estimator by default), aggregated the
same way. The advantages are the group advantages of `group_advantages`.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import check_clip, normaliser, prepare
from gspo.algorithms._masked import clip_indicators, clipped_surrogate, seq_mean_token_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["grpo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["grpo"]["clip_high"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """GRPO loss, minus the objective of GSPO paper eq. 1 with the token ratio of eq. 2.

    w_{i,t} = exp(logprobs[i, t] - old_logprobs[i, t])
    loss = -(1/G) sum_i (1/|y_i|) sum_t min(w_{i,t} A_i, clip(w_{i,t}, 1 - clip_low, 1 + clip_high) A_i)

    G = `num_sequences`: responses (with >= 1 token) in the whole optimizer step, across processes and
    minibatch slices; default: this call's. Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,).
    (The GSPO paper's GRPO baseline used clip_high = 0.27.)
    correction: optional (B, T) rollout-correction weights multiplying each token's surrogate.
    """
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                    correction=correction)
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences")

    ratio = torch.exp(batch.token_log_ratios())  # (B, T) w_{i,t}
    adv = batch.advantages[:, None]  # (B, 1)
    surrogate = clipped_surrogate(ratio, adv, clip_low, clip_high)  # (B, T)
    policy = -seq_mean_token_mean(batch.corrected(surrogate), batch.mask, n)

    low, high, outside = (flag & batch.mask for flag in clip_indicators(ratio, adv, clip_low, clip_high))
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=low, clipped_high=high, outside=outside)
    reference = reference_term(batch, kl_estimator, lambda kl: seq_mean_token_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)
