"""Shared by the vLLM tier's engine and server tests: prompts on the tiny vocabulary and the log-probability
gap to the training module (importable because pytest puts this directory, which has a conftest, on
``sys.path``)."""

from __future__ import annotations

import torch

from gspo.logprobs import token_logprobs

LOGPROB_ATOL = 1e-4  # fp32; measured max |diff| ~5e-6 (see docs/vllm.md)
LONG = 160  # prompt tokens: longer than vLLM's 16-token prefix-cache block, many times over


def sample_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length``, ``length - 1`` or ``length - 2`` tokens."""
    g = torch.Generator().manual_seed(seed)
    # ids 2..17: the tiny vocabulary without pad (0) and EOS (1)
    return [torch.randint(2, 18, (length - (i % 3),), generator=g).tolist() for i in range(count)]


def max_logprob_diff(rollout, model, temperature: float) -> float:
    """max |engine log-prob - training module's| over the generated tokens."""
    with torch.no_grad():
        reference = token_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                   rollout.completion_ids.shape[1], temperature=temperature)
    return float((rollout.logprobs - reference)[rollout.completion_mask].abs().max())
