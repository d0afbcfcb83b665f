"""Closed-form tests of the post-GSPO objectives (CISPO, SAPO, GMPO, DPPO-TV / -KL, LUSPO, Dr. GRPO):
value and gradient against float64 references written from the papers' equations, on ragged masks with
junk in the padding; batch-split invariance with the global normaliser; on-policy values; hand examples."""

from __future__ import annotations

import math

import pytest
import torch

from gspo import (
    cispo_loss,
    dppo_kl_loss,
    dppo_tv_loss,
    dr_grpo_loss,
    gmpo_loss,
    gspo_loss,
    gspo_token_loss,
    luspo_loss,
    reduce_metrics,
    sapo_loss,
)

MAX_LEN = 9  # Dr. GRPO's generation budget in these tests (>= every response)
PADS = [math.inf, -math.inf, math.nan]


def rows(mask):
    """(i, real token positions) per response with >= 1 token."""
    return [(i, mask[i].nonzero().flatten()) for i in range(mask.shape[0]) if bool(mask[i].any())]


def adv_at(adv, i, t):
    return adv[i, t] if adv.dim() == 2 else adv[i].expand(len(t))


# --- float64 references, one response at a time, from each paper's equation -----------------------------

def ref_cispo(lp, old, adv, mask, clip_low=1.0, clip_high=3.0):
    total = 0.0
    for i, t in rows(mask):
        w = torch.exp(lp[i, t] - old[i, t]).detach().clamp(1 - clip_low, 1 + clip_high)
        total = total + (w * adv_at(adv, i, t) * lp[i, t]).sum()
    return -total / mask.sum()


def ref_sapo(lp, old, adv, mask, tau_pos=1.0, tau_neg=1.05):
    total = 0.0
    for i, t in rows(mask):
        a = adv_at(adv, i, t)
        tau = torch.where(a > 0, torch.tensor(tau_pos, dtype=a.dtype), torch.tensor(tau_neg, dtype=a.dtype))
        f = torch.sigmoid(tau * (torch.exp(lp[i, t] - old[i, t]) - 1)) * 4 / tau
        total = total + (f * a).mean()
    return -total / len(rows(mask))


def ref_gmpo(lp, old, adv, mask, clip_low=0.4, clip_high=0.4):
    """GMPO eq. 3 literally: sgn(A) * (prod_t |min(r A, clip(r, e^-lo, e^hi) A)|)^(1/|y|)."""
    total = 0.0
    for i, t in rows(mask):
        r = torch.exp(lp[i, t] - old[i, t])
        a = adv[i]
        terms = torch.minimum(r * a, r.clamp(math.exp(-clip_low), math.exp(clip_high)) * a).abs()
        total = total + torch.sign(a) * terms.prod() ** (1.0 / len(t))
    return -total / len(rows(mask))


def ref_dppo(lp, old, adv, mask, kind, delta_low, delta_high, max_ratio=10.0):
    total = 0.0
    for i, t in rows(mask):
        p, q, a = torch.exp(lp[i, t]).detach(), torch.exp(old[i, t]), adv_at(adv, i, t)
        if kind == "tv":
            out = torch.where(a > 0, p - q > delta_high, p - q < -delta_low)
        else:
            kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
            out = torch.where(a > 0, (kl > delta_high) & (p > q), (kl > delta_low) & (p < q))
        w = torch.exp(lp[i, t] - old[i, t]).detach().clamp(max=max_ratio)
        total = total + torch.where(out, 0.0, w * a * lp[i, t]).sum()
    return -total / mask.sum()


def ref_luspo(lp, old, adv, mask, clip_low=3e-4, clip_high=4e-4):
    total = 0.0
    for i, t in rows(mask):
        s = torch.exp((lp[i, t] - old[i, t]).mean())
        total = total + len(t) * torch.minimum(s * adv[i], s.clamp(1 - clip_low, 1 + clip_high) * adv[i])
    return -total / len(rows(mask))


def ref_dr_grpo(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, max_length=MAX_LEN):
    total = 0.0
    for i, t in rows(mask):
        w, a = torch.exp(lp[i, t] - old[i, t]), adv_at(adv, i, t)
        total = total + torch.minimum(w * a, w.clamp(1 - clip_low, 1 + clip_high) * a).sum()
    return -total / (len(rows(mask)) * max_length)


# name -> (loss, reference, keyword arguments of both, normaliser, accepts (B, T) advantages)
CASES = {
    "cispo": (cispo_loss, ref_cispo, {"clip_low": 0.1, "clip_high": 0.2}, "num_tokens", True),
    "cispo_defaults": (cispo_loss, ref_cispo, {}, "num_tokens", True),
    "sapo": (sapo_loss, ref_sapo, {}, "num_sequences", True),
    "gmpo": (gmpo_loss, ref_gmpo, {}, "num_sequences", False),
    "dppo_tv": (dppo_tv_loss, lambda *a, **k: ref_dppo(*a, kind="tv", **{"delta_low": 0.2, "delta_high": 0.2, **k}),
                {}, "num_tokens", True),
    "dppo_kl": (dppo_kl_loss, lambda *a, **k: ref_dppo(*a, kind="kl", **{"delta_low": 0.05, "delta_high": 0.05, **k}),
                {}, "num_tokens", True),
    "dppo_kl_cap": (dppo_kl_loss, lambda *a, **k: ref_dppo(*a, kind="kl", **k),
                    {"delta_low": 0.02, "delta_high": 0.1, "max_ratio": 1.2}, "num_tokens", True),
    "luspo": (luspo_loss, ref_luspo, {"clip_low": 0.02, "clip_high": 0.02}, "num_sequences", False),
    "dr_grpo": (dr_grpo_loss, ref_dr_grpo, {}, "num_sequences", True),
}


def extra(name):
    return {"max_length": MAX_LEN} if name == "dr_grpo" else {}


def random_batch(seed, lengths, width, spread=0.5, token_adv=False):
    """float64 (logprobs leaf, old_logprobs, advantages, mask); log-probs in (-3, 0)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    old = -torch.rand(b, width, generator=g, dtype=torch.float64) * 3 - 0.05  # (B, T)
    lp = (old + spread * torch.randn(b, width, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    shape = (b, width) if token_adv else (b,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    return lp.requires_grad_(), old, adv, mask


def junk(x, mask, pad):
    where_real = mask if x.dim() == 2 else mask.any(-1)
    return torch.where(where_real, x.detach(), torch.tensor(pad, dtype=x.dtype))


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("name, token_adv", [(n, t) for n, c in CASES.items() for t in (False, True) if c[4] or not t])
def test_value_and_gradient_match_the_float64_reference(name, token_adv, pad):
    loss_fn, ref_fn, kwargs, _, _ = CASES[name]
    lp, old, adv, mask = random_batch(1, [5, 1, 7, 3, 0, 6], width=7, token_adv=token_adv)
    expected = ref_fn(lp, old, adv, mask, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, lp)

    dirty = junk(lp, mask, pad).requires_grad_()
    out = loss_fn(dirty, junk(old, mask, pad), junk(adv, mask, pad), mask, **kwargs, **extra(name))
    (grad,) = torch.autograd.grad(out.loss, dirty)
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert bool((grad[~mask] == 0).all())
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", ["cispo", "gmpo", "dppo_tv", "dppo_kl", "luspo", "dr_grpo"])
def test_the_reference_cases_exercise_both_branches(name):
    """The random batch of the reference test has both clipped / masked and free tokens."""
    loss_fn, _, kwargs, _, _ = CASES[name]
    lp, old, adv, mask = random_batch(1, [5, 1, 7, 3, 0, 6], width=7)
    frac = loss_fn(lp, old, adv, mask, **kwargs, **extra(name)).metrics["loss/clip_frac"].item()
    assert 0.0 < frac < 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_batch_split_with_the_global_normaliser_reproduces_the_batch(name):
    loss_fn, _, kwargs, norm, _ = CASES[name]
    lp, old, adv, mask = random_batch(2, [3, 0, 7, 1, 5, 2, 6], width=7)
    ref = old + 0.1
    count = int(mask.sum()) if norm == "num_tokens" else int(mask.any(-1).sum())
    kw = {**kwargs, **extra(name), norm: count, "beta": 0.05}
    whole = loss_fn(lp, old, adv, mask, ref_logprobs=ref, **kw)
    (whole_grad,) = torch.autograd.grad(whole.loss, lp)
    total, grad, parts = 0.0, torch.zeros_like(whole_grad), []
    for start, stop, width in [(0, 2, 3), (2, 3, 7), (3, 7, 7)]:  # different padding widths
        part_lp = lp.detach()[start:stop, :width].clone().requires_grad_()
        out = loss_fn(part_lp, old[start:stop, :width], adv[start:stop], mask[start:stop, :width],
                      ref_logprobs=ref[start:stop, :width], **kw)
        grad[start:stop, :width] = torch.autograd.grad(out.loss, part_lp)[0]
        total = total + out.loss.detach()
        parts.append(out.metrics)
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-12)
    reduced = reduce_metrics(parts, whole.reductions)
    for key, value in whole.metrics.items():
        torch.testing.assert_close(reduced[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", ["cispo", "sapo", "gmpo", "dppo_tv", "dppo_kl", "luspo", "dr_grpo"])
def test_on_policy_value_and_gradient(name):
    loss_fn = CASES[name][0]
    lp, _, adv, mask = random_batch(3, [3, 1, 5, 2], width=5)
    old = lp.detach().clone()
    lengths = mask.sum(-1).double()
    n_tok, n_seq = lengths.sum(), 4
    out = loss_fn(lp, old, adv, mask, **extra(name))
    out.loss.backward()
    lp_sum = torch.where(mask, lp.detach(), 0).sum(-1)  # (B,) sum_t logprobs
    if name in ("cispo", "dppo_tv", "dppo_kl"):  # weight 1: -(1/N) sum A logprobs, gradient -A / N
        value, grad = -(adv * lp_sum).sum() / n_tok, -adv[:, None] / n_tok
    elif name == "sapo":  # f(1) = 2 / tau, f'(1) = 1
        tau = torch.where(adv > 0, torch.tensor(1.0, dtype=adv.dtype), torch.tensor(1.05, dtype=adv.dtype))
        value, grad = -(2 / tau * adv).sum() / n_seq, -adv[:, None] / lengths[:, None] / n_seq
    elif name == "gmpo":
        value, grad = -adv.sum() / n_seq, -adv[:, None] / lengths[:, None] / n_seq
    elif name == "luspo":  # each token gets s_i A_i / G with s_i = 1
        value, grad = -(lengths * adv).sum() / n_seq, -adv[:, None] / n_seq + 0 * lengths[:, None]
    else:  # dr_grpo
        scale = n_seq * MAX_LEN
        value, grad = -(lengths * adv).sum() / scale, -adv[:, None] / scale + 0 * lengths[:, None]
    torch.testing.assert_close(out.loss.detach(), value)
    torch.testing.assert_close(lp.grad, torch.where(mask, grad.expand_as(mask), 0.0))
    assert out.metrics["loss/clip_frac"].item() == 0.0
    assert out.metrics["ratio/min"].item() == out.metrics["ratio/max"].item() == 1.0


# --- hand examples ------------------------------------------------------------------------------------

def test_gmpo_worked_example_clips_only_the_outlier_token_in_log_space():
    # SPEC "Hello world": token ratios 1.25 and 3.0. log 3 = 1.0986 > 0.4 is clipped to 0.4, log 1.25 kept.
    lp = torch.tensor([[0.25, 0.30]], dtype=torch.float64).log().requires_grad_()
    old = torch.tensor([[0.20, 0.10]], dtype=torch.float64).log()
    out = gmpo_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool))
    rho = math.exp((math.log(1.25) + 0.4) / 2)
    assert rho == pytest.approx(1.36557, abs=1e-5)
    assert out.loss.item() == pytest.approx(-rho)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-rho / 2, 0.0]], dtype=torch.float64))
    assert out.metrics["loss/clip_frac_high"].item() == 0.5


def test_sapo_gate_is_smooth_and_asymmetric():
    from gspo.algorithms.sapo import soft_gate
    r = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(soft_gate(r, 1.0), 4 * torch.sigmoid(r - 1))
    assert soft_gate(torch.tensor(1.0), 1.05).item() == pytest.approx(2 / 1.05)
    # gradient weight 4 sigma (1 - sigma): 1 on-policy, decays faster for the larger (negative-A) temperature
    lp = torch.tensor([[math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    grads = []
    for a in (1.0, -1.0):
        (g,) = torch.autograd.grad(sapo_loss(lp, old, torch.tensor([a], dtype=torch.float64),
                                             torch.ones(1, 1, dtype=torch.bool)).loss, lp)
        grads.append(abs(g.item()))
    s_pos, s_neg = torch.sigmoid(torch.tensor(1.0)).item(), torch.sigmoid(torch.tensor(1.05)).item()
    assert grads[0] == pytest.approx(4 * s_pos * (1 - s_pos) * 2.0)
    assert grads[1] == pytest.approx(4 * s_neg * (1 - s_neg) * 2.0)
    assert grads[1] < grads[0]


@pytest.mark.parametrize("advantage, old_p, new_p, masked", [
    (+1.0, 0.60, 0.90, True),    # p - q = 0.3 > 0.2, rising with A > 0: masked
    (+1.0, 0.60, 0.30, False),   # falling with A > 0: the update pulls back, kept
    (-1.0, 0.60, 0.30, True),    # p - q = -0.3 < -0.2, falling with A < 0: masked
    (-1.0, 0.60, 0.90, False),
    (+1.0, 0.001, 0.1, False),   # ratio 100 (PPO would clip) but TV 0.099: inside the region
])
def test_dppo_tv_masks_only_large_moves_away_from_pi_old(advantage, old_p, new_p, masked):
    lp = torch.tensor([[math.log(new_p)]], dtype=torch.float64, requires_grad=True)
    out = dppo_tv_loss(lp, torch.tensor([[math.log(old_p)]], dtype=torch.float64),
                       torch.tensor([advantage], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    out.loss.backward()
    expected = 0.0 if masked else -advantage * min(new_p / old_p, 10.0)
    assert lp.grad.item() == pytest.approx(expected)
    assert out.metrics["loss/clip_frac"].item() == (1.0 if masked else 0.0)


def test_binary_kl_is_the_bernoulli_kl():
    from gspo.algorithms.dppo import binary_kl
    p, q = 0.3, 0.6
    value = binary_kl(torch.tensor(math.log(p), dtype=torch.float64), torch.tensor(math.log(q), dtype=torch.float64))
    assert value.item() == pytest.approx(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
    assert binary_kl(torch.tensor(-0.5), torch.tensor(-0.5)).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(binary_kl(torch.tensor(0.0), torch.tensor(0.0)))  # p = q = 1


def test_cispo_never_zeroes_a_gradient_it_truncates_it():
    # ratio 3 with A > 0: PPO would zero the gradient; CISPO caps the weight at 1 + clip_high.
    lp = torch.tensor([[math.log(0.3)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.1)]], dtype=torch.float64)
    out = cispo_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                     clip_high=0.28)
    out.loss.backward()
    assert lp.grad.item() == pytest.approx(-1.28)
    assert out.loss.item() == pytest.approx(-1.28 * math.log(0.3))
    assert out.metrics["loss/clip_frac_high"].item() == 1.0


def test_luspo_is_gspo_times_the_response_length():
    lp, old, adv, mask = random_batch(4, [4, 1, 6], width=6, spread=0.01)
    lengths = mask.sum(-1).double()
    for i in range(3):  # response by response (normaliser 1 each): LUSPO = |y_i| * GSPO
        row = slice(i, i + 1)
        torch.testing.assert_close(luspo_loss(lp[row], old[row], adv[row], mask[row]).loss,
                                   lengths[i] * gspo_loss(lp[row], old[row], adv[row], mask[row]).loss)


def test_dr_grpo_needs_a_max_length_at_least_the_longest_response():
    lp, old, adv, mask = random_batch(5, [4, 2], width=4)
    with pytest.raises(ValueError, match="needs max_length"):
        dr_grpo_loss(lp, old, adv, mask)
    with pytest.raises(ValueError, match="shorter than a response"):
        dr_grpo_loss(lp, old, adv, mask, max_length=3)
    a = dr_grpo_loss(lp, old, adv, mask, max_length=4).loss
    b = dr_grpo_loss(lp, old, adv, mask, max_length=8).loss
    torch.testing.assert_close(b, a / 2)  # a constant normaliser: the loss scales as 1 / L


@pytest.mark.parametrize("loss_fn", [cispo_loss, sapo_loss, dppo_tv_loss, dppo_kl_loss, gspo_token_loss])
def test_per_token_advantages_equal_to_the_response_advantage_change_nothing(loss_fn):
    lp, old, adv, mask = random_batch(6, [3, 5, 1], width=5)
    a = loss_fn(lp, old, adv, mask)
    b = loss_fn(lp, old, adv[:, None].expand(-1, 5), mask)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(b.loss, lp)[0], torch.autograd.grad(a.loss, lp)[0])


@pytest.mark.parametrize("loss_fn", [gmpo_loss, luspo_loss])
def test_sequence_level_objectives_refuse_per_token_advantages(loss_fn):
    lp, old, _, mask = random_batch(7, [2, 3], width=3)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 3\), expected \(2,\)"):
        loss_fn(lp, old, torch.zeros(2, 3, dtype=torch.float64), mask)


@pytest.mark.parametrize("loss_fn, bad", [
    (sapo_loss, {"tau_pos": 0.0}), (sapo_loss, {"tau_neg": -1.0}), (gmpo_loss, {"clip_low": -0.1}),
    (dppo_tv_loss, {"delta_high": -0.1}), (dppo_kl_loss, {"max_ratio": 0.5}), (cispo_loss, {"clip_low": 1.5}),
])
def test_invalid_hyperparameters_are_named(loss_fn, bad):
    lp, old, adv, mask = random_batch(8, [2, 3], width=3)
    with pytest.raises(ValueError, match=next(iter(bad))):
        loss_fn(lp, old, adv, mask, **bad)


# --- properties over the whole registry (hypothesis) ---------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gspo import OBJECTIVES  # noqa: E402


@st.composite
def dirty_batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.0, 1e-3, 0.3, 40.0]))  # 40: log-ratios beyond MAX_LOG_RATIO
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    lp = (old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).clamp(max=0.0)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return lp, old, adv, mask, draw(st.sampled_from([math.inf, -math.inf, math.nan, 1e30]))


@settings(max_examples=40, deadline=None)
@given(batch=dirty_batches(), name=st.sampled_from(list(OBJECTIVES)))
def test_padding_contents_never_change_any_registered_objective(batch, name):
    lp, old, adv, mask, pad = batch
    objective = OBJECTIVES[name]
    kw = {"max_length": 6} if objective.needs_max_length else {}
    weights = torch.where(mask, 0.5 + torch.arange(mask.shape[1], dtype=torch.float64), 0.0)

    def run(lp_, old_, adv_, w_):
        leaf = lp_.clone().requires_grad_()
        out = objective.loss(leaf, old_, adv_, mask, ref_logprobs=old_, beta=0.1, correction=w_, **kw)
        return out.loss.detach(), torch.autograd.grad(out.loss, leaf)[0], out.metrics

    clean = run(lp, old, torch.where(mask.any(-1), adv, 0.0), weights)
    pad_t = torch.tensor(pad, dtype=torch.float64)
    dirty = run(torch.where(mask, lp, pad_t), torch.where(mask, old, pad_t), torch.where(mask.any(-1), adv, pad_t),
                torch.where(mask, weights, pad_t))
    assert torch.isfinite(clean[0]) and torch.isfinite(clean[1]).all()
    assert torch.equal(dirty[0], clean[0]) and torch.equal(dirty[1], clean[1])
    for key, value in clean[2].items():
        assert torch.isfinite(value) and torch.equal(dirty[2][key], value), key


@settings(max_examples=30, deadline=None)
@given(batch=dirty_batches(), name=st.sampled_from(list(OBJECTIVES)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_low_precision_inputs_give_finite_values_and_gradients_in_the_input_dtype(batch, name, dtype):
    lp, old, adv, mask, _ = batch
    objective = OBJECTIVES[name]
    kw = {"max_length": 6} if objective.needs_max_length else {}
    leaf = lp.to(dtype).requires_grad_()
    out = objective.loss(leaf, old.to(dtype), adv.to(dtype), mask, **kw)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and leaf.grad.dtype == dtype
    assert torch.isfinite(out.loss) and torch.isfinite(leaf.grad.float()).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
