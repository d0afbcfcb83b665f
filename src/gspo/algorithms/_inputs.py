"""Validation and preparation of loss inputs, shared by the four objectives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from gspo.algorithms._masked import clamp_log_ratio, compute_dtype, in_support, masked, per_sequence_mean


@dataclass(frozen=True)
class PolicyBatch:
    """Loss inputs in the compute dtype, padding replaced by 0 (with `where`).

    `mask` holds the response tokens the loss uses: the caller's mask minus the tokens outside a top-k /
    top-p support (-inf in `logprobs`, `old_logprobs` or `ref_logprobs`, see `in_support`), which are
    counted in `out_of_support` and contribute nothing. `lengths` count the kept tokens, so a
    sequence-level ratio (GSPO's length-normalised s_i) is the geometric mean over the kept tokens.
    """

    logprobs: torch.Tensor  # (B, T) carries the gradient back to the caller's tensor
    old_logprobs: torch.Tensor  # (B, T) detached
    advantages: torch.Tensor  # (B,) or (B, T) detached; 0 on padding and on empty responses
    mask: torch.Tensor  # (B, T) bool
    lengths: torch.Tensor  # (B,) |y_i|, compute dtype
    ref_logprobs: torch.Tensor | None  # (B, T) detached, or None
    correction: torch.Tensor | None = None  # (B, T) detached rollout-correction weights >= 0, 0 on padding
    out_of_support: torch.Tensor | None = None  # 0-d, response tokens dropped for a -inf log-probability

    def advantages_per_token(self) -> torch.Tensor:
        """(B, T) per-token advantages, or (B, 1) per-response ones, for broadcasting against (B, T)."""
        return self.advantages if self.advantages.dim() == 2 else self.advantages[:, None]

    def corrected(self, surrogate: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token `surrogate` times the correction weights; unchanged (same tensor) without one."""
        return surrogate if self.correction is None else surrogate * self.correction

    def sequence_correction(self) -> torch.Tensor | None:
        """(B,) the mean correction weight over each response's tokens (the weight of a sequence-level loss's
        per-response surrogate): a sequence-level correction's own weight, or the kept share of a token mask."""
        return None if self.correction is None else per_sequence_mean(self.correction, self.mask)

    @property
    def has_tokens(self) -> torch.Tensor:
        return self.lengths > 0  # (B,) bool

    @property
    def sequence_count(self) -> torch.Tensor:
        """0-d: responses with at least one token, in the compute dtype."""
        return self.has_tokens.sum().to(self.lengths.dtype)

    @property
    def token_count(self) -> torch.Tensor:
        """0-d: response tokens, in the compute dtype."""
        return self.lengths.sum()

    def token_log_ratios(self) -> torch.Tensor:
        """(B, T) clamped log pi_theta - log pi_old; 0 on padding."""
        return clamp_log_ratio(self.logprobs - self.old_logprobs)

    def sequence_log_ratios(self, clamp: bool = True) -> torch.Tensor:
        """(B,) (1/|y_i|) sum_t (log pi_theta - log pi_old), clamped unless asked not to: log s_i, GSPO eq. 7."""
        log_ratio = per_sequence_mean(self.logprobs - self.old_logprobs, self.mask)  # (B,)
        return clamp_log_ratio(log_ratio) if clamp else log_ratio


def _check_2d(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tensor.shape != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logprobs has shape {tuple(shape)}; "
                         f"both must be (B, T)")


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be bool or hold only 0 and 1")
    return mask != 0


def check_clip(clip_low: float, clip_high: float) -> None:
    if not (0.0 <= clip_low <= 1.0 and math.isfinite(clip_low)):
        raise ValueError(f"clip_low must lie in [0, 1] (lower bound 1 - clip_low >= 0), got {clip_low}")
    if not (0.0 <= clip_high and math.isfinite(clip_high)):
        raise ValueError(f"clip_high must be finite and >= 0, got {clip_high}")


def prepare(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    token_advantages: bool = False,
    correction: torch.Tensor | None = None,
) -> PolicyBatch:
    """Validate shapes and dtypes, cast to the compute dtype and blank out padding."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    _check_2d("old_logprobs", old_logprobs, shape)
    _check_2d("mask", mask, shape)
    if ref_logprobs is not None:
        _check_2d("ref_logprobs", ref_logprobs, shape)
    if correction is not None:
        _check_2d("correction", correction, shape)
    allowed = [(shape[0],), tuple(shape)] if token_advantages else [(shape[0],)]
    if tuple(advantages.shape) not in allowed:
        wanted = " or ".join(str(a) for a in allowed)
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected {wanted} "
                         f"for logprobs of shape {tuple(shape)}")
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")

    given = as_bool_mask(mask)  # (B, T)
    mask = in_support(given, logprobs, old_logprobs, ref_logprobs)  # (B, T) never subtract two -inf
    dtype = compute_dtype(logprobs, old_logprobs, advantages, ref_logprobs)
    lengths = mask.sum(dim=-1).to(dtype)  # (B,)
    adv_mask = mask if advantages.dim() == 2 else lengths > 0
    ref = None if ref_logprobs is None else masked(ref_logprobs.detach().to(dtype), mask)  # (B, T)
    weights = None if correction is None else _correction_weights(correction, mask, dtype)  # (B, T)
    return PolicyBatch(
        logprobs=masked(logprobs.to(dtype), mask),  # (B, T)
        old_logprobs=masked(old_logprobs.detach().to(dtype), mask),  # (B, T)
        advantages=masked(advantages.detach().to(dtype), adv_mask),  # (B,) or (B, T)
        mask=mask,
        lengths=lengths,
        ref_logprobs=ref,
        correction=weights,
        out_of_support=(given.sum() - mask.sum()).to(dtype),  # mask is a subset of given
    )


def _correction_weights(correction: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) detached weights in `dtype`, 0 on padding; finite and >= 0 on response tokens or an error."""
    if not correction.is_floating_point():
        raise ValueError(f"correction must be a floating-point tensor, got {correction.dtype}")
    weights = masked(correction.detach().to(dtype), mask)  # (B, T)
    if not bool(((weights >= 0) & torch.isfinite(weights)).all()):
        raise ValueError("correction weights must be finite and >= 0 on response tokens")
    return weights


def normaliser(value: Real | torch.Tensor | None, local_count: torch.Tensor, name: str) -> torch.Tensor:
    """The divisor of a loss: `value` (a global count) if given, else this call's count.

    A count of 0 (nothing to learn from anywhere) is treated as 1 so the loss is 0, never NaN. A Python
    number smaller than this call's own count is an error: it cannot be the global count.
    """
    if value is None:
        return local_count.clamp_min(1)
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=local_count.device, dtype=local_count.dtype).clamp_min(1)
    if not math.isfinite(value) or value < int(local_count.item()):
        raise ValueError(f"{name}={value} is smaller than this call's own count {int(local_count.item())}; "
                         f"pass the count over the whole optimizer step (all processes and slices)")
    return torch.tensor(max(float(value), 1.0), dtype=local_count.dtype, device=local_count.device)
