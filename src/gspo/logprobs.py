"""Per-token log-probabilities of completion tokens, for log-probability recomputation and training.

``token_logprobs`` returns log pi(y_t | x, y_<t) under ``logits / temperature`` for the completion part
of the shared ``[left-padded prompt | right-padded completion]`` layout (see :mod:`gspo.rollout.base`).

Why not ``model(...).logits``: for a 151,936-token vocabulary the full (B, L, V) float32 logits of a
batch of 8 x 1,024 tokens take 5 GB, and log_softmax plus its backward triple that. Here the decoder
body runs once for hidden states; the LM head, log_softmax and gather then run over chunks of the
completion tokens inside a custom autograd function that keeps no logits between forward and backward
and recomputes each chunk's logits in the backward, working in place in one (chunk, V) float32 buffer.
Peak memory is about one chunk of logits; value and gradient equal the full-logits path up to float
rounding. Under bfloat16 autocast the head's GEMMs run in bfloat16 in both passes (the backward, which
runs after the autocast block, recomputes in the forward's dtype), the softmax in float32. Positions
whose completion mask is False (padding after EOS) are skipped and get log-probability 0, so padding
never carries inf or NaN.

Top-k / top-p: a sampler that truncates samples from the renormalised distribution over the kept tokens,
so that distribution, not the full softmax, is the behaviour policy. ``token_logprobs(..., top_k=, top_p=)``
computes log-probabilities over the same support, derived from the (tempered) logits exactly as the sampler
derives it (``truncation_mask``), and ``truncated_log_softmax`` is the helper both sides call. The support is
a piecewise-constant function of the logits and carries no gradient; the renormalised log-softmax over it does.

Models whose logits are post-processed after the LM head (Gemma-2 soft-capping, Cohere's logit scale,
Granite's logit scaling, ...) cannot be reproduced from ``lm_head(hidden)``; for those, and for models
whose decoder body or output layer cannot be found, ``token_logprobs`` falls back to the model's own
logits: the body runs once, then the model's own head and post-processing over ~``chunk_size``-token
column chunks, each recomputed in the backward (activation checkpointing), so no (B, T, V) tensor exists
(one whole-model forward, restricted to the last T + 1 positions, where no body can be found).
``chunked=False`` forces that path. The chunked path reads ``lm_head.weight`` directly (and keeps it for
the backward), so under FSDP the head must belong to the root unit, whose forward gathers it (as
``gspo.distributed.wrap_for_training`` does); a head sharded as its own unit needs ``chunked=False``.
Under DDP, call it inside the wrapped module's forward so that gradients are synchronised.

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
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 512  # 512 x 151,936-vocab float32 logits = 311 MB per chunk; big enough for fast matmuls
# On a GPU: 2,048 x 151,936 float32 logits = 1.2 GB per chunk, GEMMs large enough to keep the tensor cores
# busy and 4x fewer chunk launches; a small share of a 40-80 GB device.
GPU_CHUNK_TOKENS = 2048


def default_chunk_tokens(device: torch.device) -> int:
    """Completion tokens per LM-head chunk on ``device``: :data:`GPU_CHUNK_TOKENS` on CUDA, else
    :data:`DEFAULT_CHUNK_TOKENS`."""
    return GPU_CHUNK_TOKENS if device.type == "cuda" else DEFAULT_CHUNK_TOKENS

# Config attributes that signal logit post-processing after the LM head, which the chunked path does not
# reproduce. A value of None (or a neutral 1.0 scale) means the feature is off.
_LOGIT_POSTPROCESSING_ATTRS = (
    "final_logit_softcapping",
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)
_NEUTRAL_VALUES = (None, 1.0, False)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids from a (B, L) attention mask: cumsum - 1, clamped at 0 on left padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)


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


def supports_chunked(model: torch.nn.Module) -> bool:
    """Whether ``token_logprobs`` can use the chunked path: a separate decoder body, a linear output
    layer, and no known logit post-processing in the config."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, torch.nn.Linear) or body is None or body is model:
        return False
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    return not any(
        getattr(config, attr, None) not in _NEUTRAL_VALUES for config in configs for attr in _LOGIT_POSTPROCESSING_ATTRS
    )


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
            the module docstring; falls back to one plain forward where that does not apply).
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
        body_out = model.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            **forward_kwargs,
        )
        # The hidden state at position i predicts token i + 1: the T completion tokens are predicted by
        # the positions L - T - 1 .. L - 2.
        hidden = body_out[0][:, -num_tokens - 1 : -1]  # (B, T, H) last hidden state, final norm applied
    targets = input_ids[:, -num_tokens:]  # (B, T)
    mask = attention_mask[:, -num_tokens:].bool()  # (B, T)
    head = model.get_output_embeddings()
    selected = _ChunkedLinearLogprobs.apply(
        hidden[mask], head.weight, head.bias, targets[mask], float(temperature), int(chunk_size), truncation
    )  # (N,) N = number of real completion tokens
    logprobs = selected.new_zeros(mask.shape)  # (B, T)
    logprobs[mask] = selected
    return logprobs


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
    body_out = _separate_body(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **forward_kwargs,
    )
    hidden = body_out[0][:, -num_tokens - 1 : -1]  # (B, T, H) final norm applied
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


def _chunk_logits(hidden, weight, bias, temperature, truncation=None):
    """(C, V) ``(hidden @ weight.T + bias) / temperature`` for one chunk of rows, in float32 or wider;
    with ``truncation`` = (top_k, top_p), -inf outside the sampler's support. The GEMM runs in the inputs'
    dtype (the chunked function casts them to :func:`_compute_dtype` first) or under the caller's autocast."""
    logits = F.linear(hidden, weight, bias)  # (C, V)
    logits = logits.to(_wide(logits.dtype))
    if temperature != 1.0:
        # In place is safe: ``logits`` is a fresh matmul output or its float32 copy.
        logits.div_(temperature)
    if truncation is not None:
        logits.masked_fill_(~truncation_mask(logits, *truncation), float("-inf"))
    return logits


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The LM head's GEMM dtype: the autocast dtype where autocast is on for the inputs' device (and would
    cast them: it leaves float64 alone), else the inputs' own (promoted) dtype.

    The chunked function decides this once in its forward and runs every GEMM of both passes in it, as
    ``torch.amp.custom_fwd`` / ``custom_bwd`` do for CUDA only: the backward runs outside the autocast
    block, where a plain recompute would be float32 (three float32 GEMMs per chunk, and the gradient of
    float32 logits while the value came from bfloat16 ones).
    """
    device = hidden.device.type
    wide = torch.promote_types(hidden.dtype, weight.dtype)
    if wide != torch.float64 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return wide


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype when it is wider (float64 in gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite (C, V) ``logits`` with exp(logits - row max); return the (C,) logsumexp and (C, 1) row sums.

    In place so that a chunk costs one (C, V) buffer (``torch.logsumexp`` allocates a second one);
    dividing the result by the row sums gives the softmax.
    """
    row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    sums = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)  # (C, 1)
    return (row_max + sums.log()).squeeze(1), sums


# Vocabulary rows per step of the weight gradient's float32 accumulation: a (rows, H) compute-dtype product
# and its float32 copy stay small (16 + 32 MB at H = 1,024) instead of a whole (V, H) temporary per chunk.
ACCUMULATE_ROWS = 8192


def _add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with the GEMM in ``a``'s dtype (bfloat16) and the sum in ``out``'s (float32).

    out: (V, H) float32, a: (V, C), b: (C, H). By slices of :data:`ACCUMULATE_ROWS` rows through one
    float32 buffer: a mixed-dtype ``add_`` of a whole (V, H) product costs ~4x more than its GEMM's share.
    """
    buffer = out.new_empty(min(ACCUMULATE_ROWS, out.shape[0]), out.shape[1])  # (R, H)
    for start in range(0, out.shape[0], ACCUMULATE_ROWS):
        part = a[start : start + ACCUMULATE_ROWS] @ b  # (R, H) compute dtype
        rows = buffer[: part.shape[0]]
        out[start : start + part.shape[0]].add_(rows.copy_(part))


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """log_softmax((h W^T + b) / tau)[target] over rows of h, in chunks, recomputing logits in backward.

    Backward per chunk, with p = softmax(z), z = logits / tau, g the incoming gradient (C,):
    dL/dlogits = g * (onehot(target) - p) / tau, then the two matmuls of a linear layer. With a top-k /
    top-p ``truncation`` the logits outside the support are -inf in both passes, so p is the truncated,
    renormalised softmax and those logits get no gradient.

    Precision: the three GEMMs of both passes (logits, and the input and weight gradients) run in the
    forward's compute dtype (:func:`_compute_dtype`: bfloat16 under bfloat16 autocast), the softmax and
    its gradient in float32, and the weight gradient is accumulated over chunks in float32: value and
    gradient are those of ``log_softmax(linear(h).float())`` under the same autocast, as one
    full-logits forward computes them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, truncation=None):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,)
        dtype = _compute_dtype(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)  # (N, H), (V, H) the GEMMs' operands, cast once
        b = bias.to(dtype) if bias is not None else None  # (V,)
        out = torch.empty(hidden.shape[0], dtype=_wide(dtype), device=hidden.device)  # (N,)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _chunk_logits(h[start:end], w, b, temperature, truncation)  # (C, V)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)  # (C,)
            out[start:end] = picked - _exp_shifted_(logits)[0]
        # the compute-dtype copy of hidden (half the bytes under bf16); the weight is recast in backward
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.temperature, ctx.chunk_size, ctx.truncation = temperature, chunk_size, truncation
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        dtype = h.dtype  # the forward's compute dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w = weight.to(dtype)  # (V, H)
        b = bias.to(dtype) if bias is not None else None  # (V,)
        grad_hidden = torch.empty_like(h, dtype=ctx.hidden_dtype) if need_hidden else None  # (N, H)
        # Accumulate parameter gradients in float32 across chunks, cast once at the end.
        wide = _wide(weight.dtype)
        grad_weight = torch.zeros_like(weight, dtype=wide) if need_weight else None  # (V, H)
        grad_bias = torch.zeros_like(bias, dtype=wide) if need_bias else None  # (V,)
        for start in range(0, h.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h_chunk = h[start:end]  # (C, H)
            scale = grad_out[start:end, None].to(_wide(dtype)) / ctx.temperature  # (C, 1) g / tau
            logits = _chunk_logits(h_chunk, w, b, ctx.temperature, ctx.truncation)  # (C, V)
            _, sums = _exp_shifted_(logits)  # logits now hold exp(z - max z); p = logits / sums
            grad_logits = logits.mul_(-scale / sums)  # (C, V) -g * p / tau, in the logits' buffer
            grad_logits.scatter_add_(1, targets[start:end, None], scale)  # + g * onehot / tau
            grad_low = grad_logits.to(dtype)  # (C, V) the GEMMs' operand (the same buffer in float32)
            if need_hidden:
                grad_hidden[start:end] = grad_low @ w  # (C, H)
            if need_weight:
                if dtype == wide:
                    grad_weight.addmm_(grad_low.t(), h_chunk)  # (V, H)
                else:  # a compute-dtype GEMM, summed over chunks in float32
                    _add_product_(grad_weight, grad_low.t(), h_chunk)  # (V, H)
            if need_bias:
                grad_bias += grad_low.sum(dim=0, dtype=wide)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
