"""Between gspo's engine interface and vLLM's: request parameters in, completions and routing out.

Pure functions (torch and numpy only, no vLLM import), shared by the in-process engine and the server
client, so both turn the same vLLM output into the same :class:`Rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo.moe.routing import RoutingRecord
from gspo.rollout.base import Rollout, SamplingParams


@dataclass
class Completion:
    """One vLLM completion as gspo needs it, whatever the transport (Python objects or JSON)."""

    token_ids: list[int]  # generated tokens, the stopping EOS included
    logprobs: list[float]  # the sampler's log-probability of each generated token
    routed_experts: object = None  # (prompt + completion tokens, MoE layers, top_k) array, or None


def sampling_kwargs(params: SamplingParams, eos_ids: list[int], seed: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` (and of the server's completion request) for one row.

    gspo's EOS ids stop generation (``stop_token_ids``; vLLM keeps the stop token in ``token_ids``),
    unless ``ignore_eos``; ``logprobs=0`` returns the sampled token's log-probability only.
    """
    return {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0 = off, in gspo and in vLLM
        "seed": seed,
        "logprobs": 0,
        "ignore_eos": params.ignore_eos,
        "stop_token_ids": [] if params.ignore_eos else list(eos_ids),
        "skip_special_tokens": False,
        "detokenize": False,
    }


def to_rollout(prompts: list[list[int]], completions: list[Completion], params: SamplingParams, *,
               pad_token_id: int, eos_ids: list[int]) -> Rollout:
    """The :class:`Rollout` of ``completions`` (one per prompt), in gspo's padded layout.

    A completion ends at its first EOS (kept, inside the mask) unless ``ignore_eos``; ``truncated`` is
    "no EOS within max_new_tokens" (all rows with ``ignore_eos``), as in the built-in engine.
    """
    batch, width_p = len(prompts), max(len(p) for p in prompts)
    cut = [_end(c.token_ids, eos_ids, params) for c in completions]  # tokens kept per row
    width_t = max(max(n for n, _ in cut), 1)
    prompt_ids = torch.full((batch, width_p), pad_token_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((batch, width_p), dtype=torch.bool)  # (B, P)
    completion_ids = torch.full((batch, width_t), pad_token_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((batch, width_t), dtype=torch.bool)  # (B, T)
    logprobs = torch.zeros((batch, width_t), dtype=torch.float32)  # (B, T)
    truncated = torch.zeros(batch, dtype=torch.bool)  # (B,)
    for row, (prompt, completion, (n, ended)) in enumerate(zip(prompts, completions, cut)):
        prompt_ids[row, width_p - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[row, width_p - len(prompt):] = True
        completion_ids[row, :n] = torch.tensor(completion.token_ids[:n], dtype=torch.long)
        completion_mask[row, :n] = True
        logprobs[row, :n] = torch.tensor(completion.logprobs[:n], dtype=torch.float32)
        truncated[row] = params.ignore_eos or not ended
    routing = None
    if completions and completions[0].routed_experts is not None:
        routing = routing_record([c.routed_experts for c in completions], [len(p) for p in prompts],
                                 [n for n, _ in cut], width_p, width_t)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, logprobs=logprobs, truncated=truncated, routing=routing)


def _end(token_ids: list[int], eos_ids: list[int], params: SamplingParams) -> tuple[int, bool]:
    """(tokens kept, ended at EOS) of one completion."""
    if len(token_ids) > params.max_new_tokens:
        raise ValueError(f"vLLM returned {len(token_ids)} tokens for max_new_tokens={params.max_new_tokens}")
    if not params.ignore_eos:
        for i, token in enumerate(token_ids):
            if token in eos_ids:
                return i + 1, True
    return len(token_ids), False


def routing_record(routed: list, prompt_lens: list[int], completion_lens: list[int], width_p: int,
                   width_t: int) -> RoutingRecord:
    """gspo's :class:`RoutingRecord` ((B, P + T, k) per MoE layer) from vLLM's ``routed_experts``.

    vLLM returns, per request, a (tokens, layers, top_k) integer array over the request's prompt and
    generated tokens (the last sampled token is never forwarded, so it may hold one row fewer). Each
    row is placed at its positions in the ``[left-padded prompt | right-padded completion]`` layout;
    padding positions, and a position vLLM did not forward, get experts ``0..k-1`` (they are masked
    out, as :meth:`RoutingRecord.pad_to` does for gspo's own capture).
    """
    arrays = [torch.as_tensor(r).to(torch.int16) for r in routed]  # each (tokens, L, k), vLLM's own int16
    layers, top_k = arrays[0].shape[1], arrays[0].shape[2]
    filler = torch.arange(top_k, dtype=torch.int16).expand(len(arrays), width_p + width_t, layers, top_k)
    out = filler.clone()  # (B, P + T, L, k)
    for row, (experts, p, t) in enumerate(zip(arrays, prompt_lens, completion_lens)):
        if experts.shape[1:] != (layers, top_k):
            raise ValueError(f"routed_experts of row {row} has shape {tuple(experts.shape)}, expected "
                             f"(tokens, {layers}, {top_k}) like row 0")
        if experts.shape[0] < p + t - 1:
            raise ValueError(f"routed_experts of row {row} covers {experts.shape[0]} tokens; the request has "
                             f"{p} prompt + {t} completion tokens")
        out[row, width_p - p: width_p] = experts[:p]
        generated = experts[p: p + t]
        out[row, width_p: width_p + len(generated)] = generated
    return RoutingRecord([out[:, :, layer] for layer in range(layers)])
