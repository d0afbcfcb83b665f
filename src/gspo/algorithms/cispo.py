"""CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4-5): clipped importance-sampling weight, REINFORCE gradient.

Kept: the detached, truncated token ratio as the coefficient of log pi_theta, so no token ever loses its
gradient (the paper's motivation: PPO clipping drops rare "fork" tokens such as "However" or "Wait"), and
the token-mean over all response tokens of the step. The paper sets no lower bound on the weight
("eps_low set to a large value"); it does not publish eps_high. Default here: lower bound 0
(clip_low = 1) and upper bound 4 (clip_high = 3), the cap of ScaleRL (Khatri et al., arXiv 2510.13786)
and of Tinker's CISPO. The paper's optional token mask M_{i,t} is left out (DPPO's masks cover that).
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import check_clip, normaliser, prepare
from gspo.algorithms._masked import token_sum_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["cispo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["cispo"]["clip_high"],
    num_tokens: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """CISPO loss, minus MiniMax-M1 eq. 4 with the clipped weight of eq. 5.

    w_{i,t} = exp(logprobs - old_logprobs),  w^_{i,t} = clip(w_{i,t}, 1 - clip_low, 1 + clip_high)
    loss = -(1/N) sum_{i,t} sg[w^_{i,t}] A_{i,t} logprobs[i, t]

    Gradient: every token gets -(1/N) w^_{i,t} A_{i,t} d logprobs: truncated, never zeroed. The value is
    that of the REINFORCE form (it depends on logprobs themselves, not only on the ratio). N =
    `num_tokens`, the response tokens of the whole optimizer step. advantages (B,) or (B, T).
    `loss/clip_frac_*` count tokens whose weight was truncated (their gradient is capped, not zeroed).
    """
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, token_advantages=True,
                    correction=correction)
    n = normaliser(num_tokens, batch.token_count, "num_tokens")

    ratio = torch.exp(batch.token_log_ratios())  # (B, T) w_{i,t}
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()  # (B, T) sg[w^_{i,t}]
    adv = batch.advantages_per_token()  # (B, T) or (B, 1)
    surrogate = weight * adv * batch.logprobs  # (B, T)
    policy = -token_sum_mean(batch.corrected(surrogate), batch.mask, n)

    low, high = ratio < 1.0 - clip_low, ratio > 1.0 + clip_high  # (B, T) truncated below / above
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=low & batch.mask, clipped_high=high & batch.mask,
                             outside=(low | high) & batch.mask)
    reference = reference_term(batch, kl_estimator, lambda kl: token_sum_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)
