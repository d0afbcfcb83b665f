"""Dr. GRPO (Liu et al., Understanding R1-Zero-Like Training: A Critical Perspective, arXiv 2503.20783).

GRPO without its two length / difficulty biases: no per-response 1/|y_i| (the token surrogates are
summed) and no std division of the advantages (use `group_advantages(..., scale="none")`). The sum is
divided by a constant, the number of responses times the generation budget L (`max_length`, the
rollout's max_new_tokens), so the loss scale never depends on how long the responses happened to be.
PPO clip 0.2 / 0.2 as in the paper.
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import check_clip, normaliser, prepare
from gspo.algorithms._masked import clip_indicators, clipped_surrogate, token_sum_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput


def dr_grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_length: int | None = None,
    clip_low: float = PAPER_DEFAULTS["dr_grpo"]["clip_low"],
    clip_high: float = PAPER_DEFAULTS["dr_grpo"]["clip_high"],
    num_sequences: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """Dr. GRPO loss: GRPO's token surrogate, summed, over the constant G * L.

    loss = -(1 / (G L)) sum_{i,t} min(w_{i,t} A_{i,t}, clip(w_{i,t}, 1 - clip_low, 1 + clip_high) A_{i,t})

    G = `num_sequences` (responses with >= 1 token in the whole step); L = `max_length`, required: the
    generation budget (rollout max_new_tokens), the same for every call of the step. advantages (B,) or
    (B, T). The optional KL term is aggregated the same way.
    """
    if max_length is None:
        raise ValueError("dr_grpo_loss needs max_length (the generation budget, rollout max_new_tokens)")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    check_clip(clip_low, clip_high)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, token_advantages=True,
                    correction=correction)
    longest = int(batch.lengths.max().item()) if batch.lengths.numel() else 0
    if longest > max_length:
        raise ValueError(f"max_length={max_length} is shorter than a response in this call ({longest} tokens)")
    n = normaliser(num_sequences, batch.sequence_count, "num_sequences") * max_length

    ratio = torch.exp(batch.token_log_ratios())  # (B, T) w_{i,t}
    adv = batch.advantages_per_token()  # (B, T) or (B, 1)
    surrogate = clipped_surrogate(ratio, adv, clip_low, clip_high)  # (B, T)
    policy = -token_sum_mean(batch.corrected(surrogate), batch.mask, n)

    low, high, outside = (flag & batch.mask for flag in clip_indicators(ratio, adv, clip_low, clip_high))
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=low, clipped_high=high, outside=outside)
    reference = reference_term(batch, kl_estimator, lambda kl: token_sum_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)
