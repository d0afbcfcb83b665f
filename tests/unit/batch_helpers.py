"""A shared test batch for the micro-batch and chunked-pass tests."""

from __future__ import annotations

import torch


def padded_batch(rows: int, prompt_width: int, completion_width: int, *, seed: int = 0, vocab: int = 18):
    """(ids, attention, completion mask): left-padded prompts of 2..``prompt_width`` tokens, right-padded
    responses of 1..``completion_width`` tokens; ids (B, P + T), attention (B, P + T) bool, mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, prompt_width + 1, (rows,), generator=g)
    completion = torch.randint(1, completion_width + 1, (rows,), generator=g)
    columns = torch.arange(prompt_width + completion_width)  # (L,)
    attention = (columns >= prompt_width - prompt[:, None]) & (columns < prompt_width + completion[:, None])  # (B, L)
    ids = torch.randint(2, vocab, (rows, prompt_width + completion_width), generator=g).masked_fill(~attention, 0)
    return ids, attention, attention[:, prompt_width:].clone()
