"""DAPO (Yu et al., arXiv 2503.14476): token-mean loss with clip-higher, overlong reward shaping and
the dynamic-sampling filter, each a function of its own.

Kept: decoupled clip (0.2 / 0.28), loss summed over every response token of the step and divided by
the step's token count, overlong penalty (DAPO eq. 13), group filter. The paper uses no KL; the
optional term is there for ablations and is token-mean aggregated like the policy term.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import check_clip, normaliser, prepare
from gspo.algorithms._masked import clip_indicators, clipped_surrogate, token_sum_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.advantages import check_groups
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def dapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = PAPER_DEFAULTS["dapo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["dapo"]["clip_high"],
    num_tokens: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """DAPO loss: token ratio, "Clip-Higher", "Token-Level Policy Gradient Loss" (DAPO section 3).

    loss = -(1/N) sum_{i,t} min(w_{i,t} A_i, clip(w_{i,t}, 1 - clip_low, 1 + clip_high) A_i),
    w_{i,t} = exp(logprobs - old_logprobs). N = `num_tokens`: the response tokens of the whole
    optimizer step, across processes and minibatch slices; default: this call's. Longer responses
    weigh more, by design. Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,).
    correction: optional (B, T) rollout-correction weights multiplying each token's surrogate.
    """
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                    correction=correction)
    n = normaliser(num_tokens, batch.token_count, "num_tokens")

    ratio = torch.exp(batch.token_log_ratios())  # (B, T) w_{i,t}
    adv = batch.advantages[:, None]  # (B, 1)
    surrogate = clipped_surrogate(ratio, adv, clip_low, clip_high)  # (B, T)
    policy = -token_sum_mean(batch.corrected(surrogate), batch.mask, n)

    low, high, outside = (flag & batch.mask for flag in clip_indicators(ratio, adv, clip_low, clip_high))
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=low, clipped_high=high, outside=outside)
    reference = reference_term(batch, kl_estimator, lambda kl: token_sum_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO eq. 13, soft overlong punishment added to the reward; (B,) float32.

    0 for |y| <= max_len - cache_len; ((max_len - cache_len) - |y|) / cache_len inside the buffer
    (linear from 0 down to -1 at |y| = max_len); -1 for |y| > max_len. cache_len = 0 means no buffer.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be (B,), got shape {tuple(lengths.shape)}")
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = lengths.to(torch.float32)  # (B,)
    start = float(max_len - cache_len)
    buffer = (start - lengths) / max(cache_len, 1)  # (B,) only used where start < |y| <= max_len
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), buffer)  # (B,)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)  # (B,)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO "Dynamic Sampling" filter (eq. 11: keep a group when 0 < #correct < G): (N / group_size,) bool,
    True for groups whose rewards are not all equal (all-equal groups have zero advantage and carry no
    gradient). Pass the rule-based rewards before the overlong shaping (eq. 13), as DAPO and verl's
    ``filter_groups.metric=acc`` do: a group that differs only in its length penalties has no accuracy signal.
    Rewards laid out group by group."""
    check_groups(rewards, group_size)
    groups = rewards.view(-1, group_size)  # (N / G, G)
    return (groups != groups[:, :1]).any(dim=-1)  # (N / G,)
