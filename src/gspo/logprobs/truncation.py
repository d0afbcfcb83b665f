"""The top-k / top-p support a truncating sampler draws from, and log-probabilities over it.

Top-k / top-p: a sampler that truncates samples from the renormalised distribution over the kept tokens,
so that distribution, not the full softmax, is the behaviour policy. ``token_logprobs(..., top_k=, top_p=)``
computes log-probabilities over the same support, derived from the (tempered) logits exactly as the sampler
derives it (``truncation_mask``), and ``truncated_log_softmax`` is the helper both sides call. The support is
a piecewise-constant function of the logits and carries no gradient; the renormalised log-softmax over it does.
"""

from __future__ import annotations

import torch


def truncation_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) bool, True on the tokens a top-k / top-p sampler keeps, from (..., V) tempered logits.

    The same support as the in-process sampler's filter (``gspo.rollout.hf``): top-k keeps every token at
    least as likely as the k-th (ties kept); top-p is then applied to the top-k-renormalised distribution
    and keeps the smallest prefix of most likely tokens whose probability reaches ``top_p`` (a token is
    dropped when the tokens ranked strictly above it already reach it; the most likely token always stays).
    """
    _check_truncation(top_k, top_p)
    with torch.no_grad():
        keep = torch.ones_like(logits, dtype=torch.bool)  # (..., V)
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
            keep = logits >= kth
        if top_p < 1.0:
            filtered = logits.masked_fill(~keep, float("-inf"))  # (..., V)
            sorted_logits, order = filtered.sort(dim=-1, descending=True)  # (..., V)
            sorted_probs = sorted_logits.softmax(dim=-1)  # (..., V)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # (..., V) in sorted order
            keep = keep & ~torch.zeros_like(drop).scatter(-1, order, drop)
    return keep


def truncated_log_softmax(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) log-probabilities of the top-k / top-p truncated, renormalised distribution of ``logits``
    (already divided by the temperature); -inf outside the kept support. ``top_k=0, top_p=1.0`` is the
    plain ``log_softmax``. The rollout engine and the trainer both call this, so their ratio is 1 on-policy.
    """
    if not _truncates(top_k, top_p):
        return logits.log_softmax(dim=-1)
    keep = truncation_mask(logits, top_k, top_p)  # (..., V)
    return logits.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)


def _truncates(top_k: int, top_p: float) -> bool:
    _check_truncation(top_k, top_p)
    return top_k > 0 or top_p < 1.0


def _check_truncation(top_k: int, top_p: float) -> None:
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
