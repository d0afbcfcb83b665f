"""Log-probabilities from the model's own logits: the fallback for post-processed logits, and the reference.

Models whose logits are post-processed after the LM head (Gemma-2 soft-capping, Cohere's logit scale,
Granite's logit scaling, ...) cannot be reproduced from ``lm_head(hidden)``; for those, and for models
whose decoder body or output layer cannot be found, ``token_logprobs`` falls back to the model's own
logits: the body runs once, then the model's own head and post-processing over ~``chunk_size``-token
column chunks, each recomputed in the backward (activation checkpointing), so no (B, T, V) tensor exists
(one whole-model forward, restricted to the last T + 1 positions, where no body can be found).
``chunked=False`` forces that path. :func:`token_logprobs_reference` is the plain full-logits path, for
tests and benchmarks.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from gspo.logprobs.chunked_head import _wide
from gspo.logprobs.layout import completion_hidden, position_ids_from_mask
from gspo.logprobs.truncation import truncated_log_softmax


def token_logprobs_reference(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    *,
    temperature: float = 1.0,
    **forward_kwargs,
) -> torch.Tensor:
    """The plain path, for tests and benchmarks: full (B, L, V) ``model(...).logits``, then log_softmax.

    Same contract as :func:`token_logprobs`; memory grows with B * L * V.
    """
    return _full_logits_logprobs(
        model, input_ids, attention_mask, num_completion_tokens, temperature, False, forward_kwargs
    )


def _full_logits_logprobs(
    model, input_ids, attention_mask, num_tokens, temperature, keep_last, forward_kwargs, truncation=None,
    chunk_size: int = 0,
):
    """Log-probabilities from the model's own logits (any post-processing included).

    ``keep_last`` asks the model for the last T + 1 positions' logits only (``logits_to_keep``).
    ``chunk_size`` > 0 (the fallback of :func:`token_logprobs`): the decoder body runs once and the model's
    own head and logit post-processing (:func:`_model_head_logits`) over columns of about ``chunk_size``
    tokens, each recomputed in the backward (activation checkpointing), so no (B, T, V) tensor exists;
    0, or a model without a separate body: one forward of the whole model.
    """
    if chunk_size > 0 and _head_runs_apart(model, input_ids[:1, :1]):
        return _column_chunked_logprobs(model, input_ids, attention_mask, num_tokens, temperature, keep_last,
                                        forward_kwargs, truncation, chunk_size)
    if keep_last:
        forward_kwargs = {**forward_kwargs, "logits_to_keep": num_tokens + 1}
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **forward_kwargs,
    ).logits  # (B, L or T + 1, V)
    logits = logits[:, -num_tokens - 1 : -1]
    targets = input_ids[:, -num_tokens:]  # (B, T)
    logprobs = _logits_to_logprobs(logits, targets, temperature, truncation)  # (B, T)
    return logprobs.masked_fill(~attention_mask[:, -num_tokens:].bool(), 0.0)


def _logits_to_logprobs(logits, targets, temperature, truncation):
    """(B, c) log-probabilities of ``targets`` (B, c) under (B, c, V) ``logits``, in float32 or wider."""
    logits = logits.to(_wide(logits.dtype))  # (B, c, V) float32 or wider
    if temperature != 1.0:
        logits = logits / temperature
    if truncation is None:
        log_probs = logits.log_softmax(dim=-1)  # (B, c, V)
    else:
        log_probs = truncated_log_softmax(logits, *truncation)  # (B, c, V)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, c)


def _separate_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder body when the model has one apart from itself, else None."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    return body if body is not None and body is not model else None


@torch.no_grad()
def _head_runs_apart(model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the model's forward reaches its decoder body (``get_decoder``) directly, so that
    :func:`_model_head_logits` can hand it precomputed hidden states: probed on one (1, 1) position (a
    multimodal wrapper, say, whose forward calls another module, would otherwise run its whole body)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if _separate_body(model) is None or getattr(head, "weight", None) is None:
        return False
    probe = head.weight.new_zeros(1, 1, head.weight.shape[1])  # (1, 1, H)
    return _model_head_logits(model, probe, input_ids, {}) is not None


def _column_chunked_logprobs(model, input_ids, attention_mask, num_tokens, temperature, keep_last, forward_kwargs,
                             truncation, chunk_size):
    """(B, T) as :func:`_full_logits_logprobs`, the logits made ~``chunk_size`` tokens at a time (see there)."""
    hidden = completion_hidden(_separate_body(model), input_ids, attention_mask, num_tokens,
                               forward_kwargs)  # (B, T, H) final norm applied
    targets = input_ids[:, -num_tokens:]  # (B, T)
    columns = max(1, chunk_size // max(hidden.shape[0], 1))  # (B, columns) tokens per chunk
    keep = {"logits_to_keep": 0} if keep_last else {}  # 0: every position given (the chunk's)

    def chunk_logprobs(piece: torch.Tensor, piece_targets: torch.Tensor) -> torch.Tensor:
        logits = _model_head_logits(model, piece, piece_targets, keep)  # (B, c, V)
        return _logits_to_logprobs(logits, piece_targets, temperature, truncation)  # (B, c)

    pieces = []
    for start in range(0, num_tokens, columns):
        piece, piece_targets = hidden[:, start : start + columns], targets[:, start : start + columns]
        if torch.is_grad_enabled() and piece.requires_grad:  # keep no (B, c, V) tensor for the backward
            pieces.append(checkpoint(chunk_logprobs, piece, piece_targets, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(piece, piece_targets))
    logprobs = torch.cat(pieces, dim=1)  # (B, T)
    return logprobs.masked_fill(~attention_mask[:, -num_tokens:].bool(), 0.0)


def _model_head_logits(model, hidden: torch.Tensor, input_ids: torch.Tensor, keep: dict) -> torch.Tensor | None:
    """(B, c, V) the model's own logits for (B, c, H) final hidden states: its forward runs with the decoder
    body answering ``hidden`` (the body already ran), so its head and logit post-processing (Gemma-2's
    soft-capping, Cohere's logit scale, ...) are the model's code, not a copy of it. None where the
    forward did not call the body."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    body = _separate_body(model)
    patched = vars(body).get("forward")  # an instance-level forward (a wrapper's), restored after
    answered = []

    def stand_in(*args, **kwargs):
        answered.append(True)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    body.forward = stand_in
    try:
        logits = model(input_ids=input_ids, use_cache=False, **keep).logits  # (B, c, V)
    finally:
        if patched is None:
            del body.forward  # the class's forward again
        else:
            body.forward = patched
    return logits if answered else None  # None: the forward never reached the body (see _head_runs_apart)
