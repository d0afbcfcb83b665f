"""Shared prompts: each distinct prompt of a batch runs through the decoder body once.

Shared prompts (``share_prompts=True``, the trainer's default): the G responses of a group share their
prompt, and a causal model's hidden states at prompt positions do not depend on what follows, so the
prompt half of a ``[prompt | completion]`` batch is the same computation repeated for every response.
:func:`shared_prompt_hidden` runs each distinct prompt once (keeping its keys and values in a KV cache
with autograd on), gives every row its prompt's cache, and runs only the completions on top; columns
that are padding in every row are dropped first. Value and gradient equal the one-forward path up to
float rounding (the prompt's gradient is the sum over its responses either way). It needs a decoder that
takes a cache, full attention in every layer and no activation checkpointing, and it is skipped (one
plain forward) when no prompt repeats; callers that hook per-position state (MoE routing capture or
replay, which records (B, L) tensors) must not ask for it.
"""

from __future__ import annotations

import inspect

import torch

from gspo.logprobs.layout import position_ids_from_mask


# Sharing pays when it removes at least this share of the batch's real tokens from the forward: below it,
# the second (completion) forward's fixed cost outweighs the prompt tokens saved (measured on the
# embedded model: 14 distinct prompts in a minibatch of 32, 6 prompt + 5 completion tokens: -12%).
SHARE_MIN_SAVED_FRACTION = 0.1


def shared_prompt_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         num_completion_tokens: int) -> torch.Tensor | None:
    """(B, T, H) final hidden states that predict the T completion tokens, with each distinct prompt run once.

    ``input_ids`` / ``attention_mask``: (B, P + T) ``[left-padded prompt | right-padded completion]``. The
    distinct prompts (u of them) go through the decoder body with a KV cache; the cache is expanded to the
    B rows (an index, so autograd sums the rows' gradients into their prompt) and the completions run on
    top with their own positions. Returns None, having computed nothing, where this does not apply or
    does not pay (:data:`SHARE_MIN_SAVED_FRACTION`): the caller then runs one plain forward.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    body = model.get_decoder()
    keyword = _cache_keyword(body)
    if keyword is None or _checkpointing(model):
        return None
    num_t = num_completion_tokens
    real = attention_mask.bool()  # (B, L)
    # drop columns that are padding in every row: leading prompt columns, trailing completion columns
    prompt_real = real[:, :-num_t]  # (B, P)
    first = int(prompt_real.any(dim=0).int().argmax())  # first prompt column with a real token
    completion_real = real[:, -num_t:]  # (B, T)
    used_t = int(completion_real.any(dim=0).nonzero().max()) + 1 if completion_real.any() else 1
    prompt_ids, prompt_mask = input_ids[:, first:-num_t], real[:, first:-num_t]  # (B, P')
    rep, inverse = distinct_prompts(prompt_ids, prompt_mask)  # (u,), (B,)
    u_mask = prompt_mask[rep]  # (u, P')
    saved = int(prompt_mask.sum()) - int(u_mask.sum())  # prompt tokens not run again
    if saved < SHARE_MIN_SAVED_FRACTION * int(real.sum()) or not bool(prompt_mask[:, -1].all()):
        return None
    cache = DynamicCache(config=model.config)
    if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None  # sliding-window or other special layers: keep the plain forward
    out = body(input_ids=prompt_ids[rep], attention_mask=u_mask, position_ids=position_ids_from_mask(u_mask),
               use_cache=True, **{keyword: cache})
    last_prompt = out[0][:, -1]  # (u, H) predicts the first completion token (prompts end at the last column)
    cache.batch_select_indices(inverse)  # (B, ...) every row gets its prompt's keys and values
    mask = real[:, first : real.shape[1] - num_t + used_t]  # (B, P' + T') prompt and used completion columns
    positions = position_ids_from_mask(mask)[:, -used_t:]  # (B, T')
    out = body(input_ids=input_ids[:, -num_t:][:, :used_t], attention_mask=mask, position_ids=positions,
               use_cache=True, **{keyword: cache})
    hidden = torch.cat([last_prompt[inverse, None], out[0][:, : used_t - 1]], dim=1)  # (B, T', H)
    if used_t < num_t:  # trailing columns are padding everywhere: any finite value, masked by the caller
        hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], num_t - used_t, hidden.shape[2])], dim=1)
    return hidden  # (B, T, H)


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u,) one row of each distinct prompt and (B,) each row's index into them: rows with the same prompt
    tokens in the same (left-padded) places share one prompt forward, ``rows == rep[inverse]`` prompt-wise."""
    keys = prompt_ids.masked_fill(~prompt_mask.bool(), -1)  # (B, P)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (u, P), (B,)
    rep = torch.zeros(len(unique), dtype=torch.long, device=prompt_ids.device).scatter_(
        0, inverse, torch.arange(len(inverse), device=prompt_ids.device))  # (u,) one row of each prompt
    return rep, inverse


def _checkpointing(model: torch.nn.Module) -> bool:
    """Activation checkpointing is on (transformers' newer name first): its forward runs without a cache."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)  # PEFT models answer through their base model
        if value is not None:
            return bool(value)
    return False


def _cache_keyword(body: torch.nn.Module) -> str | None:
    """The decoder body's KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(body.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)
