"""The ``[left-padded prompt | right-padded completion]`` layout (:mod:`gspo.rollout.base`): position ids, and
the final hidden states that predict the completion tokens."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids from a (B, L) attention mask: cumsum - 1, clamped at 0 on left padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)


def completion_hidden(body: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int,
                      forward_kwargs: dict) -> torch.Tensor:
    """(B, T, H) the decoder ``body``'s final hidden states (final norm applied) that predict the last
    T = ``num_tokens`` tokens of (B, L) ``input_ids``: one forward, no cache, ``forward_kwargs`` passed on."""
    body_out = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **forward_kwargs,
    )
    # The hidden state at position i predicts token i + 1: the T completion tokens are predicted by
    # the positions L - T - 1 .. L - 2.
    return body_out[0][:, -num_tokens - 1 : -1]  # (B, T, H)
