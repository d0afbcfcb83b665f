"""Masked-tensor helpers shared by the objectives.

Padding is always removed with `torch.where`, never by multiplying with the mask: 0 * inf and 0 * NaN
are NaN, and `where` also routes an exact zero gradient to the unselected positions.
"""

from __future__ import annotations

import torch

from gspo.algorithms.types import MAX_LOG_RATIO


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bfloat16 / float16 inputs are upcast)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def masked(values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """`values` where `mask`, else `fill`; gradient is exactly 0 at the filled positions."""
    return torch.where(mask, values, torch.full_like(values, fill))


def in_support(mask: torch.Tensor, *logprobs: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: `mask` minus the tokens where any of the (B, T) `logprobs` is -inf.

    A log-probability of -inf is a sampled token outside a top-k / top-p support: a sampler whose support
    differs from the trainer's float32 one (bfloat16, vLLM) can keep a boundary token the trainer's nucleus
    drops. Its ratio is undefined (-inf - -inf is NaN) and its truncated log-probability has no gradient,
    so the losses and the corrections leave such a token out (and count it) rather than subtract two -inf.
    Only the token goes, not its response: the response's other tokens have well-defined ratios, and a
    sequence-level ratio (GSPO's length-normalised s_i) over them, with |y_i| their count, is the
    response's ratio with the undefined 0/0 factor taken out; dropping the response would throw away a
    sample for a rounding difference at one position. (verl never meets such tokens: its trainer takes
    full-vocabulary log-probabilities, ignoring top-k / top-p.)
    NaN is not treated as out of support: it still propagates, so a diverged model is still detected.
    """
    keep = mask
    for values in logprobs:
        if values is not None:
            keep = keep & (values.detach() != float("-inf"))  # not isneginf: fake CUDA tensors (tests) lack it
    return keep


def clamp_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """Clamp a log-ratio before `exp` (see MAX_LOG_RATIO)."""
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of `values` (B, T) over each response's tokens; 0 for a response with no tokens."""
    lengths = mask.sum(dim=-1).clamp_min(1).to(values.dtype)  # (B,)
    return masked(values, mask).sum(dim=-1) / lengths  # (B,)


def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor, num_sequences: torch.Tensor) -> torch.Tensor:
    """sum_i (1/|y_i|) sum_t values[i, t] / num_sequences ("seq-mean-token-mean")."""
    return per_sequence_mean(values, mask).sum() / num_sequences


def token_sum_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """sum_{i,t} values[i, t] / num_tokens ("token-mean" with a global token count)."""
    return masked(values, mask).sum() / num_tokens


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), elementwise (PPO-style surrogate)."""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.minimum(ratio * advantages, clipped * advantages)


def clip_indicators(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the clipped branch is the min (zero gradient), low and high side, and where the ratio is
    outside the band whatever the advantage's sign. All three are bool, shaped like the broadcast."""
    below = ratio < 1.0 - clip_low
    above = ratio > 1.0 + clip_high
    return below & (advantages < 0), above & (advantages > 0), below | above
