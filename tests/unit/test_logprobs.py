"""Chunked log-probabilities (gspo.logprobs) against the plain full-logits path, value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import gspo.logprobs
from gspo.logprobs import (
    _ChunkedLinearLogprobs,
    supports_chunked,
    token_logprobs,
    token_logprobs_reference,
)

VOCAB, PROMPT_LEN, COMPLETION_LEN = 32, 5, 9
TEMPERATURE = 0.7


def tiny_qwen3(seed: int = 0, **overrides) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **overrides,
    )
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(config)


def padded_batch(seed: int = 0):
    """(B, P + T) ids and mask: ragged left padding on prompts, ragged right padding on completions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, PROMPT_LEN + COMPLETION_LEN), generator=gen)  # (B, L)
    mask = torch.ones_like(ids, dtype=torch.bool)  # (B, L)
    mask[1, :2] = False  # left-padded prompt
    mask[2, :4] = False
    mask[2, -3:] = False  # completion that ended early
    mask[3, -8:] = False
    ids[~mask] = 0
    return ids, mask


def value_and_grads(fn, model, ids, mask, autocast=None, **kwargs):
    """Log-probabilities and the parameter gradients of a weighted sum of them; ``autocast``: a dtype to
    run the forward (only) under."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        logprobs = fn(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, **kwargs)  # (B, T)
    weights = torch.linspace(-1.0, 2.0, logprobs.numel()).view_as(logprobs)  # (B, T) advantage stand-in
    (logprobs * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), grads


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])  # 7 does not divide the 24 real tokens
def test_chunked_matches_reference_in_value_and_gradient(chunk_size):
    model = tiny_qwen3()
    ids, mask = padded_batch()
    ref, ref_grads = value_and_grads(token_logprobs_reference, model, ids, mask)
    got, got_grads = value_and_grads(token_logprobs, model, ids, mask, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_positions_are_zero_and_finite():
    model = tiny_qwen3()
    ids, mask = padded_batch()
    logprobs = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE)  # (B, T)
    completion_mask = mask[:, -COMPLETION_LEN:]
    assert torch.isfinite(logprobs).all()
    assert (logprobs[~completion_mask] == 0).all()
    assert (logprobs[completion_mask] < 0).all()


def test_no_grad_gives_the_same_values_without_a_graph():
    model = tiny_qwen3()
    ids, mask = padded_batch()
    with torch.no_grad():
        logprobs = token_logprobs(model, ids, mask, COMPLETION_LEN, chunk_size=3)
    assert logprobs.grad_fn is None
    torch.testing.assert_close(logprobs, token_logprobs_reference(model, ids, mask, COMPLETION_LEN).detach())


def test_temperature_is_applied():
    """At temperature tau the result is log_softmax(logits / tau), which differs from tau = 1."""
    model = tiny_qwen3()
    ids, mask = padded_batch()
    with torch.no_grad():
        cold = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=0.5)
        hot = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=1.0)
        logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -COMPLETION_LEN - 1 : -1]  # (T, V)
    expected = (logits / 0.5).log_softmax(-1).gather(-1, ids[0, -COMPLETION_LEN:, None]).squeeze(-1)  # (T,)
    torch.testing.assert_close(cold[0], expected, atol=1e-5, rtol=1e-5)
    assert (cold - hot).abs().max() > 1e-2


def test_chunked_function_gradcheck_with_bias():
    """The custom backward (softmax gradient recomputed per chunk) is exact, including a head bias."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)  # (N, H)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)  # (V, H)
    bias = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)  # (V,)
    targets = torch.randint(0, 7, (5,), generator=gen)  # (N,)

    def fn(h, w, b):
        return _ChunkedLinearLogprobs.apply(h, w, b, targets, 0.8, 2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    expected = ((hidden @ weight.T + bias) / 0.8).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(fn(hidden, weight, bias), expected)


def test_bfloat16_model_matches_reference():
    model = tiny_qwen3().to(torch.bfloat16)
    ids, mask = padded_batch()
    ref, ref_grads = value_and_grads(token_logprobs_reference, model, ids, mask)
    got, got_grads = value_and_grads(token_logprobs, model, ids, mask, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # same bf16 logits, same float32 math
    for name in ref_grads:  # the chunked path accumulates the head gradient in float32: closer, not equal
        torch.testing.assert_close(got_grads[name].float(), ref_grads[name].float(), atol=2e-2, rtol=2e-2)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("chunk_size", [1000, 5])
def test_bfloat16_autocast_gradient_is_that_of_the_bfloat16_logits(chunk_size):
    """Under bfloat16 autocast the chunked head's backward recomputes in bfloat16 as its forward did: the
    gradient is the one-forward full-logits path's (``log_softmax(linear(h).float())`` under the same
    autocast), not that of float32 logits (~5e-3 away, what a float32 recompute outside autocast gave)."""
    model = tiny_qwen3()
    ids, mask = padded_batch()
    # the forward under autocast, the backward after the block, as the update runs them
    ref, ref_grads = value_and_grads(token_logprobs_reference, model, ids, mask, autocast=torch.bfloat16)
    got, got_grads = value_and_grads(token_logprobs, model, ids, mask, chunk_size=chunk_size, autocast=torch.bfloat16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        # one chunk: every GEMM as the full path's. Several: the head's weight gradient sums per-chunk
        # bfloat16 GEMM outputs in float32 (one bf16 rounding per chunk instead of one in all)
        tolerance = 1e-2 if name == "lm_head.weight" and chunk_size < mask.sum() else 1e-4
        assert _relative_error(got_grads[name], ref_grads[name]) <= tolerance, name


def test_chunked_function_runs_its_gemms_in_the_autocast_dtype_in_both_passes(monkeypatch):
    """The backward runs outside the autocast block; its recompute still uses the forward's dtype."""
    monkeypatch.setattr(gspo.logprobs.chunked_head, "ACCUMULATE_ROWS", 7)  # the weight gradient by slices of 7 rows, 40 in all
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=gen, requires_grad=True)  # (N, H) float32, as a norm's output
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)  # (V, H) float32 master weight
    targets = torch.randint(0, 40, (6,), generator=gen)  # (N,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _ChunkedLinearLogprobs.apply(hidden, weight, None, targets, 1.0, 4)
        ref = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1).gather(-1, targets[:, None])
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(got, ref.squeeze(1))
    assert _relative_error(grads[0], ref_grads[0]) <= 1e-4
    assert _relative_error(grads[1], ref_grads[1]) <= 1e-2
    full = torch.autograd.grad(  # the float32-logits gradient is measurably elsewhere
        torch.nn.functional.linear(hidden, weight).log_softmax(-1).gather(-1, targets[:, None]).sum(), hidden)[0]
    assert _relative_error(full, ref_grads[0]) > 1e-3


def tiny_gemma2(softcapping: float = 0.5) -> transformers.Gemma2ForCausalLM:
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=softcapping,
    )
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config)


def test_logit_softcapping_falls_back_to_full_logits():
    """Gemma-2 soft-caps its logits after the LM head; the chunked path would silently drop that."""
    model = tiny_gemma2(0.5)  # strong capping so that ignoring it is visible
    ids, mask = padded_batch()
    assert not supports_chunked(model)
    assert supports_chunked(tiny_qwen3())
    with torch.no_grad():
        auto = token_logprobs(model, ids, mask, COMPLETION_LEN)
        ref = token_logprobs_reference(model, ids, mask, COMPLETION_LEN)
        forced = token_logprobs(model, ids, mask, COMPLETION_LEN, chunked=True)
    torch.testing.assert_close(auto, ref)
    assert (forced - ref).abs().max() > 1e-2
    # Capped at 0.5, every logit is within 0.5 of 0: log-probabilities stay near -log(V).
    real = mask[:, -COMPLETION_LEN:]
    assert (auto[real] - (-math.log(VOCAB))).abs().max() < 1.0


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_full_logits_fallback_runs_the_model_s_head_by_column_chunks(autocast):
    """The fallback (soft-capped logits) makes its (B, c, V) logits a few columns at a time with the model's
    own head and capping, recomputed in the backward: value and gradient of the one-forward path."""
    model = tiny_gemma2(3.0)
    ids, mask = padded_batch()
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    ref, ref_grads = value_and_grads(token_logprobs_reference, model, ids, mask, autocast=autocast)
    assert shapes == [(4, PROMPT_LEN + COMPLETION_LEN, VOCAB)]  # the whole (B, L, V) at once
    shapes.clear()
    got, got_grads = value_and_grads(token_logprobs, model, ids, mask, chunk_size=8, autocast=autocast)
    # a (1, 1) probe; 8 tokens of 4 rows: columns of 2, each chunk in the forward and again in the backward
    assert shapes == [(1, 1, VOCAB)] + [(4, 2, VOCAB)] * 4 + [(4, 1, VOCAB)] * 2 + [(4, 2, VOCAB)] * 4
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for name in ref_grads:  # bfloat16: the (tied) head's gradient sums per-chunk bf16 products
        head = name in ("lm_head.weight", "model.embed_tokens.weight") and autocast is not None
        assert _relative_error(got_grads[name], ref_grads[name]) <= (1e-2 if head else 1e-5), name


def test_full_logits_fallback_runs_one_forward_when_the_model_s_forward_bypasses_its_body():
    # a wrapper whose forward does not call get_decoder() (a multimodal model, say): no stand-in hidden states
    model = tiny_gemma2(3.0)
    ids, mask = padded_batch()
    model.get_decoder = lambda: torch.nn.Identity()  # not what the forward calls
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        got = token_logprobs(model, ids, mask, COMPLETION_LEN, chunk_size=8)
        ref = token_logprobs_reference(model, ids, mask, COMPLETION_LEN)
    assert shapes[1] == (4, COMPLETION_LEN + 1, VOCAB)  # after the (1, 1) probe, one whole forward
    torch.testing.assert_close(got, ref)


def test_invalid_temperature_is_rejected():
    model = tiny_qwen3()
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=0.0)
