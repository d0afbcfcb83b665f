"""The chunked LM head: log-probabilities of target tokens without the (B, T, V) logits.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gspo.logprobs.truncation import truncation_mask

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


def _chunk_logits(hidden, weight, bias, temperature, truncation=None, out=None):
    """(C, V) ``(hidden @ weight.T + bias) / temperature`` for one chunk of rows, in float32 or wider;
    with ``truncation`` = (top_k, top_p), -inf outside the sampler's support. The GEMM runs in the inputs'
    dtype (the chunked function casts them to :func:`_compute_dtype` first) or under the caller's autocast.
    ``out``: a (>= C, V) float32 buffer that receives a lower-precision GEMM's widened result (reused across
    chunks instead of a fresh (C, V) float32 tensor each)."""
    logits = F.linear(hidden, weight, bias)  # (C, V)
    wide = _wide(logits.dtype)
    if logits.dtype != wide:
        logits = out[: logits.shape[0]].copy_(logits) if out is not None and out.dtype == wide else logits.to(wide)
    if temperature != 1.0:
        # In place is safe: ``logits`` is a fresh matmul output or its float32 copy.
        logits.div_(temperature)
    if truncation is not None:
        logits.masked_fill_(~truncation_mask(logits, *truncation), float("-inf"))
    return logits


def _logits_buffer(rows: int, chunk_size: int, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """One (C, V) float32 buffer for the widened logits of every chunk of a ``dtype`` GEMM (None when the GEMM is
    already float32 or wider: its output is the buffer). A call's chunks reuse it instead of each allocating
    (and page-faulting) 311 MB at C = 512, V = 151,936."""
    wide = _wide(dtype)
    if dtype == wide:
        return None
    return torch.empty((min(rows, chunk_size), weight.shape[0]), dtype=wide, device=weight.device)


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


def _add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, overwrite: bool = False) -> None:
    """``out += a @ b`` (``overwrite``: ``out = a @ b``) with the GEMM in ``a``'s dtype (bfloat16) and the sum in
    ``out``'s (float32).

    out: (V, H) float32, a: (V, C), b: (C, H). By slices of :data:`ACCUMULATE_ROWS` rows through one
    float32 buffer: a mixed-dtype ``add_`` of a whole (V, H) product costs ~4x more than its GEMM's share.
    The first chunk overwrites, so ``out`` needs no zero-filling (a pass over 622 MB at the 0.6B shape).
    """
    buffer = None if overwrite else out.new_empty(min(ACCUMULATE_ROWS, out.shape[0]), out.shape[1])  # (R, H)
    for start in range(0, out.shape[0], ACCUMULATE_ROWS):
        part = a[start : start + ACCUMULATE_ROWS] @ b  # (R, H) compute dtype
        target = out[start : start + part.shape[0]]
        if overwrite:
            target.copy_(part)
        else:
            target.add_(buffer[: part.shape[0]].copy_(part))


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
        buffer = _logits_buffer(hidden.shape[0], chunk_size, weight, dtype)  # (C, V) float32 or None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _chunk_logits(h[start:end], w, b, temperature, truncation, out=buffer)  # (C, V)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)  # (C,)
            out[start:end] = picked - _exp_shifted_(logits)[0]
        # the compute-dtype copies of hidden (half the bytes under bf16) and of the weight: the backward runs right
        # after this micro-batch's forward, while every activation is still held, so keeping the weight's cast
        # adds nothing to the peak and saves recasting it (a fresh 311 MB at the 0.6B shape)
        ctx.save_for_backward(h, w, b, targets)
        ctx.temperature, ctx.chunk_size, ctx.truncation = temperature, chunk_size, truncation
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, b, targets = ctx.saved_tensors  # (N, H), (V, H), (V,) or None in the forward's compute dtype; (N,)
        dtype = h.dtype  # the forward's compute dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(h, dtype=ctx.hidden_dtype) if need_hidden else None  # (N, H)
        # Accumulate parameter gradients in float32 across chunks (the first chunk writes), cast once at the end.
        wide = _wide(ctx.weight_dtype)
        grad_weight = torch.empty_like(w, dtype=wide) if need_weight else None  # (V, H)
        grad_bias = torch.zeros_like(b, dtype=_wide(ctx.bias_dtype)) if need_bias else None  # (V,)
        buffer = _logits_buffer(h.shape[0], ctx.chunk_size, w, dtype)  # (C, V) float32 or None
        low = torch.empty_like(buffer, dtype=dtype) if buffer is not None else None  # (C, V) the GEMMs' operand
        for start in range(0, h.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h_chunk = h[start:end]  # (C, H)
            first = start == 0
            scale = grad_out[start:end, None].to(_wide(dtype)) / ctx.temperature  # (C, 1) g / tau
            logits = _chunk_logits(h_chunk, w, b, ctx.temperature, ctx.truncation, out=buffer)  # (C, V)
            _, sums = _exp_shifted_(logits)  # logits now hold exp(z - max z); p = logits / sums
            grad_logits = logits.mul_(-scale / sums)  # (C, V) -g * p / tau, in the logits' buffer
            grad_logits.scatter_add_(1, targets[start:end, None], scale)  # + g * onehot / tau
            # (C, V) the GEMMs' operand in the compute dtype (the float32 buffer itself when that is float32)
            grad_low = low[: grad_logits.shape[0]].copy_(grad_logits) if low is not None else grad_logits.to(dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_low @ w  # (C, H)
            if need_weight:
                if dtype != wide:  # a compute-dtype GEMM, summed over chunks in float32
                    _add_product_(grad_weight, grad_low.t(), h_chunk, overwrite=first)  # (V, H)
                elif first:
                    torch.mm(grad_low.t(), h_chunk, out=grad_weight)  # (V, H)
                else:
                    grad_weight.addmm_(grad_low.t(), h_chunk)  # (V, H)
            if need_bias:
                grad_bias += grad_low.sum(dim=0, dtype=grad_bias.dtype)
        grad_weight = grad_weight.to(ctx.weight_dtype) if need_weight else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
