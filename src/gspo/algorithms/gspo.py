"""GSPO and GSPO-token (Zheng et al., Group Sequence Policy Optimization, arXiv 2507.18071).

Kept from the paper: the length-normalised sequence ratio (eq. 7), sequence-level clipping with the
paper's ranges 3e-4 / 4e-4, one weight per response (mean over responses), and GSPO-token (eq. 13-14)
for per-token advantages. Added: an optional KL term to a reference policy (the paper uses none),
aggregated like the policy term.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import check_clip, normaliser, prepare
from gspo.algorithms._masked import clamp_log_ratio, clip_indicators, clipped_surrogate, masked
from gspo.algorithms._masked import seq_mean_token_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["gspo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["gspo"]["clip_high"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """GSPO loss, minus the objective of eq. 5 with the sequence ratio of eq. 7.

    s_i = exp((1/|y_i|) sum_t (logprobs - old_logprobs)[i, t])   (geometric mean of token ratios)
    loss = -(1/G) sum_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

    Gradient (eq. 10): every token of response i gets -(1/G) s_i A_i / |y_i| while unclipped, 0 once
    clipped. G = `num_sequences`: the number of responses (with >= 1 token) in the whole optimizer step,
    across processes and minibatch slices; default: this call's. A response with no tokens adds nothing.
    A token whose log-probability is -inf (outside a top-k / top-p support) is left out, and |y_i| counts
    the response's other tokens (`in_support`).
    The clip ranges are the paper's (3e-4, 4e-4): s_i is an average, so it moves orders of magnitude less
    than a token ratio. GRPO's 0.2 is accepted but almost never clips (docs/objectives.md, misreading 3).

    Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,). ref_logprobs / beta / kl_estimator:
    optional beta * KL to a reference policy, averaged over each response's tokens, then over responses.
    correction: optional (B, T) rollout-correction weights (`rollout_correction`); each response's
    surrogate is multiplied by the mean weight of its tokens. None: no correction.
    """
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                    correction=correction)
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences")

    ratio = torch.exp(batch.sequence_log_ratios())  # (B,) s_i, eq. 7
    surrogate = clipped_surrogate(ratio, batch.advantages, clip_low, clip_high)  # (B,)
    if batch.correction is not None:  # per-response weight: the mean correction weight of its tokens
        surrogate = surrogate * batch.sequence_correction()  # (B,)
    policy = -masked(surrogate, batch.has_tokens).sum() / n

    low, high, outside = clip_indicators(ratio, batch.advantages, clip_low, clip_high)  # (B,) each
    per_token = [(flag & batch.has_tokens)[:, None].expand_as(batch.mask) for flag in (low, high, outside)]
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=per_token[0], clipped_high=per_token[1],
                             outside=per_token[2])
    seq_clipped = ((low | high) & batch.has_tokens).to(ratio.dtype)  # (B,)
    metrics.add("loss/seq_clip_frac", seq_clipped.sum() / batch.sequence_count.clamp_min(1), "mean/sequences")
    reference = reference_term(batch, kl_estimator, lambda kl: seq_mean_token_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)


def gspo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["gspo_token"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["gspo_token"]["clip_high"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """GSPO-token loss, minus the objective of eq. 13 with the token ratio of eq. 14.

    s_{i,t} = sg[s_i] * exp(logprobs[i, t] - sg[logprobs[i, t]])   (value s_i, gradient of a token ratio)
    loss = -(1/G) sum_i (1/|y_i|) sum_t min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - clip_low, 1 + clip_high) A_{i,t})

    advantages: (B,) per response or (B, T) per token. With per-response advantages it equals
    `gspo_loss` in value, clipping and gradient (every token of response i again gets
    -(1/G) s_i A_i / |y_i|); per-token advantages only change how the gradient is split across tokens.
    Normaliser, clip ranges and KL term as in `gspo_loss`. correction: optional (B, T) weights multiplying
    each token's surrogate (`rollout_correction`).
    """
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, token_advantages=True,
                    correction=correction)
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences")

    seq_log_ratio = batch.sequence_log_ratios(clamp=False).detach()  # (B,) sg[log s_i]
    # exp(sg[log s_i] + logprobs - sg[logprobs]) == sg[s_i] * exp(logprobs - sg[logprobs]); clamping the sum
    # zeroes the gradient of a response whose log s_i passed MAX_LOG_RATIO, exactly as in gspo_loss.
    log_ratio = clamp_log_ratio(seq_log_ratio[:, None] + batch.logprobs - batch.logprobs.detach())  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T) s_{i,t}, eq. 14
    adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None]  # (B, T) or (B, 1)
    surrogate = clipped_surrogate(ratio, adv, clip_low, clip_high)  # (B, T)
    policy = -seq_mean_token_mean(batch.corrected(surrogate), batch.mask, n)

    low, high, outside = (flag & batch.mask for flag in clip_indicators(ratio, adv, clip_low, clip_high))
    metrics = policy_metrics(batch, ratio=torch.exp(clamp_log_ratio(seq_log_ratio)), clipped_low=low, clipped_high=high,
                             outside=outside)
    seq_clipped = ((low | high).any(dim=-1) & batch.has_tokens).to(ratio.dtype)  # (B,) any token clipped
    metrics.add("loss/seq_clip_frac", seq_clipped.sum() / batch.sequence_count.clamp_min(1), "mean/sequences")
    reference = reference_term(batch, kl_estimator, lambda kl: seq_mean_token_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)
