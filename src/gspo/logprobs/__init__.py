"""Per-token log-probabilities of completion tokens, for log-probability recomputation and training.

``token_logprobs`` returns log pi(y_t | x, y_<t) under ``logits / temperature`` for the completion part
of the shared ``[left-padded prompt | right-padded completion]`` layout (see :mod:`gspo.rollout.base`).
It picks one of the paths below, each a module with one job:

- :mod:`~gspo.logprobs.chunked_head`: the decoder body once, the LM head, log_softmax and gather over
  chunks of the completion tokens in a custom autograd function that keeps no (B, T, V) logits (the default);
- :mod:`~gspo.logprobs.shared_prompts`: each distinct prompt of a group run once (``share_prompts=True``);
- :mod:`~gspo.logprobs.model_logits`: the model's own logits, for models whose logits are post-processed
  after the LM head (``chunked=False``), and the plain full-logits reference for tests and benchmarks;
- :mod:`~gspo.logprobs.truncation`: the top-k / top-p support and its renormalised log-softmax, shared
  with the sampler; :mod:`~gspo.logprobs.layout`: position ids and the completion positions' hidden states.

The chunked path reads ``lm_head.weight`` directly (and keeps it for the backward), so under FSDP the head
must belong to the root unit, whose forward gathers it (as ``gspo.distributed.wrap_for_training`` does); a
head sharded as its own unit needs ``chunked=False``. Under DDP, call it inside the wrapped module's
forward so that gradients are synchronised.
"""

from __future__ import annotations

import inspect

import torch

from gspo.logprobs.chunked_head import (DEFAULT_CHUNK_TOKENS, GPU_CHUNK_TOKENS, _ChunkedLinearLogprobs,
                                        default_chunk_tokens, supports_chunked)
from gspo.logprobs.layout import completion_hidden, position_ids_from_mask
from gspo.logprobs.model_logits import _full_logits_logprobs, token_logprobs_reference
from gspo.logprobs.shared_prompts import distinct_prompts, shared_prompt_hidden
from gspo.logprobs.truncation import _truncates, truncated_log_softmax, truncation_mask

# gspo.logprobs is where these are imported from (the submodules are its parts)
__all__ = ["DEFAULT_CHUNK_TOKENS", "GPU_CHUNK_TOKENS", "_ChunkedLinearLogprobs", "default_chunk_tokens",
           "distinct_prompts", "position_ids_from_mask", "shared_prompt_hidden", "supports_chunked", "token_logprobs",
           "token_logprobs_reference", "truncated_log_softmax", "truncation_mask"]


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_size: int | None = None,
    chunked: bool | None = None,
    share_prompts: bool = False,
    **forward_kwargs,
) -> torch.Tensor:
    """(B, T) float32 log pi(y_t | x, y_<t) of the last T = ``num_completion_tokens`` tokens.

    Args:
        input_ids: (B, L) ``[left-padded prompt | right-padded completion]``.
        attention_mask: (B, L) True (or 1) on real tokens; its last T columns are the completion mask.
        temperature: log-probabilities come from ``log_softmax(logits / temperature)``; pass the sampling
            temperature (1.0 for greedy sampling, whose sampler log-probabilities are untempered).
        top_k, top_p: the sampler's truncation (0 / 1.0 = off, the default, bit-identical to before): the
            log-probabilities are then those of the truncated, renormalised distribution
            (:func:`truncated_log_softmax` of the tempered logits); a token outside the support gets -inf.
        chunk_size: completion tokens per LM-head chunk; peak memory is about one (chunk, V) float32 buffer.
            None: by device (:func:`default_chunk_tokens`).
        chunked: None picks the chunked path when :func:`supports_chunked`; False forces full logits.
        share_prompts: run each distinct prompt once and reuse its keys/values for all its responses (see
            :mod:`gspo.logprobs.shared_prompts`; falls back to one plain forward where that does not apply).
        forward_kwargs: passed to the decoder body (e.g. MoE routing replay).

    Differentiable w.r.t. the model's parameters; also usable under ``torch.no_grad()``.
    Returns 0 where the completion mask is False.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    if not 0 < num_completion_tokens < input_ids.shape[1]:
        raise ValueError(
            f"num_completion_tokens must be in [1, {input_ids.shape[1] - 1}] (at least one prompt token), "
            f"got {num_completion_tokens}"
        )
    truncation = (int(top_k), float(top_p)) if _truncates(top_k, top_p) else None
    if chunk_size is None:
        chunk_size = default_chunk_tokens(input_ids.device)
    if chunked is None:
        chunked = supports_chunked(model)
    if not chunked:
        keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        return _full_logits_logprobs(model, input_ids, attention_mask, num_completion_tokens, temperature, keep,
                                     forward_kwargs, truncation, chunk_size=chunk_size)
    num_tokens = num_completion_tokens
    hidden = None
    if share_prompts and not forward_kwargs:
        hidden = shared_prompt_hidden(model, input_ids, attention_mask, num_tokens)  # (B, T, H) or None
    if hidden is None:
        body = model.get_decoder()
        hidden = completion_hidden(body, input_ids, attention_mask, num_tokens, forward_kwargs)  # (B, T, H)
    targets = input_ids[:, -num_tokens:]  # (B, T)
    mask = attention_mask[:, -num_tokens:].bool()  # (B, T)
    head = model.get_output_embeddings()
    selected = _ChunkedLinearLogprobs.apply(
        hidden[mask], head.weight, head.bias, targets[mask], float(temperature), int(chunk_size), truncation
    )  # (N,) N = number of real completion tokens
    logprobs = selected.new_zeros(mask.shape)  # (B, T)
    logprobs[mask] = selected
    return logprobs
