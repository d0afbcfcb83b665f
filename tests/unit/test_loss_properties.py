"""Property tests (hypothesis) of the four objectives: padding never matters, dtypes, empty responses,
batch splits, GSPO-token == GSPO."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo import dapo_loss, grpo_loss, gspo_loss, gspo_token_loss, reduce_metrics

LOSSES = [gspo_loss, gspo_token_loss, grpo_loss, dapo_loss]
PAD_VALUES = [math.inf, -math.inf, math.nan, 1e30, -1e30]
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def batches(draw, max_b: int = 4, max_t: int = 6):
    """float64 (logprobs, old_logprobs, ref_logprobs, advantages (B,), mask (B, T)); padding holds 0."""
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.0, 1e-4, 0.05, 1.0, 40.0]))  # 40: log-ratios beyond MAX_LOG_RATIO
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4  # (B, T)
    logprobs = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)  # (B, T)
    ref = old + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)  # (B, T)
    advantages = torch.randn(b, generator=g, dtype=torch.float64)  # (B,)
    zero = torch.zeros((), dtype=torch.float64)
    clean = [torch.where(mask, x, zero) for x in (logprobs, old, ref)]
    return (*clean, advantages, mask)


def run(loss_fn, logprobs, old, ref, adv, mask, **kwargs):
    """(loss, d loss / d logprobs, metrics) with a KL term so the reference path is exercised too."""
    leaf = logprobs.detach().clone().requires_grad_()
    out = loss_fn(leaf, old, adv, mask, ref_logprobs=ref, beta=0.1, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out.loss.detach(), grad, out.metrics


@SETTINGS
@given(batch=batches(), loss_fn=st.sampled_from(LOSSES), pad=st.sampled_from(PAD_VALUES),
       token_adv=st.booleans())
def test_padding_contents_never_change_value_or_gradient(batch, loss_fn, pad, token_adv):
    logprobs, old, ref, adv, mask = batch
    if token_adv and loss_fn is gspo_token_loss:
        adv = adv[:, None] + torch.linspace(-1, 1, mask.shape[1], dtype=torch.float64)  # (B, T)
    pad_t = torch.tensor(pad, dtype=torch.float64)

    def pollute(x, where_real):
        return torch.where(where_real, x, pad_t)

    clean = run(loss_fn, logprobs, old, ref, torch.where(mask.any(-1) if adv.dim() == 1 else mask, adv, 0.0), mask)
    dirty_adv = pollute(adv, mask.any(-1) if adv.dim() == 1 else mask)  # empty responses' advantages too
    dirty = run(loss_fn, pollute(logprobs, mask), pollute(old, mask), pollute(ref, mask), dirty_adv, mask)
    assert torch.isfinite(clean[0]) and torch.isfinite(clean[1]).all()
    assert torch.equal(dirty[0], clean[0])
    assert torch.equal(dirty[1], clean[1])
    assert bool((dirty[1][~mask] == 0).all())
    for key, value in clean[2].items():
        assert torch.isfinite(value), key
        assert torch.equal(dirty[2][key], value), key


@SETTINGS
@given(batch=batches(), loss_fn=st.sampled_from(LOSSES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_dtypes_give_finite_close_values_and_gradients_in_the_input_dtype(batch, loss_fn, dtype):
    logprobs, old, ref, adv, mask = (x.to(dtype) if x.is_floating_point() else x for x in batch)
    leaf = logprobs.clone().requires_grad_()
    out = loss_fn(leaf, old, adv, mask)
    out.loss.backward()
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert leaf.grad.dtype == dtype
    assert torch.isfinite(out.loss) and torch.isfinite(leaf.grad.float()).all()
    assert all(v.dtype == out.loss.dtype and torch.isfinite(v) for v in out.metrics.values())
    exact = loss_fn(logprobs.double(), old.double(), adv.double(), mask).loss  # same rounded inputs
    torch.testing.assert_close(out.loss.double(), exact, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(batch=batches(), loss_fn=st.sampled_from(LOSSES))
def test_empty_responses_contribute_nothing(batch, loss_fn):
    logprobs, old, ref, adv, mask = batch
    empty = torch.zeros(1, mask.shape[1], dtype=torch.bool)
    nan_row = torch.full((1, mask.shape[1]), math.nan, dtype=torch.float64)
    with_empty = run(loss_fn, torch.cat([logprobs, nan_row]), torch.cat([old, nan_row]),
                     torch.cat([ref, nan_row]), torch.cat([adv, adv.new_tensor([math.nan])]),
                     torch.cat([mask, empty]))
    without = run(loss_fn, logprobs, old, ref, adv, mask)
    # not bitwise: an extra row may change the order of a vectorised sum
    torch.testing.assert_close(with_empty[0], without[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_empty[1][:-1], without[1], rtol=1e-12, atol=1e-12)
    assert bool((with_empty[1][-1] == 0).all())
    assert with_empty[2]["count/sequences"] == without[2]["count/sequences"]
    if not bool(mask.any()):  # nothing to learn from: loss exactly 0, no NaN anywhere
        assert without[0].item() == 0.0 and all(torch.isfinite(v) for v in without[2].values())


@SETTINGS
@given(batch=batches(max_b=6), loss_fn=st.sampled_from(LOSSES), data=st.data())
def test_any_split_with_the_global_normaliser_reproduces_the_batch(batch, loss_fn, data):
    logprobs, old, ref, adv, mask = batch
    b = mask.shape[0]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, b - 1), max_size=3)) if b > 1 else []))
    if loss_fn is dapo_loss:
        kwargs = {"num_tokens": int(mask.sum())}
    else:
        kwargs = {"num_sequences": int(mask.any(-1).sum())}
    whole = run(loss_fn, logprobs, old, ref, adv, mask, **kwargs)
    parts = [run(loss_fn, logprobs[s:e], old[s:e], ref[s:e], adv[s:e], mask[s:e], **kwargs)
             for s, e in zip([0, *cuts], [*cuts, b])]
    total = sum(p[0] for p in parts)
    torch.testing.assert_close(total, whole[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole[1], rtol=1e-10, atol=1e-12)
    reductions = loss_fn(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.1).reductions
    reduced = reduce_metrics([p[2] for p in parts], reductions)
    for key, value in whole[2].items():
        torch.testing.assert_close(reduced[key], value, rtol=1e-8, atol=1e-10, msg=key)


@SETTINGS
@given(batch=batches(), clip=st.sampled_from([3e-4, 0.01, 0.2]))
def test_gspo_token_equals_gspo_for_per_response_advantages(batch, clip):
    logprobs, old, ref, adv, mask = batch
    a = run(gspo_loss, logprobs, old, ref, adv, mask, clip_low=clip, clip_high=clip)
    b = run(gspo_token_loss, logprobs, old, ref, adv, mask, clip_low=clip, clip_high=clip)
    torch.testing.assert_close(b[0], a[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b[1].sum(-1), a[1].sum(-1), rtol=1e-10, atol=1e-12)
