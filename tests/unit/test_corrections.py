"""Rollout corrections (gspo.algorithms.corrections): closed form of each mode, padding junk, splits,
validation, and how every loss applies the weights (correction=None unchanged, bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch

from gspo import (
    CORRECTION_DEFAULTS,
    CORRECTION_MODES,
    OBJECTIVES,
    dapo_loss,
    gspo_loss,
    reduce_metrics,
    rollout_correction,
)

LN = math.log


def example():
    """Two responses (3 and 2 tokens, width 3) with known per-token ratios r = pi_old / pi_rollout."""
    ratios = torch.tensor([[1.5, 3.0, 0.4], [1.0, 1.02, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rollout = torch.full((2, 3), -1.0, dtype=torch.float64)
    old = torch.where(mask, rollout + ratios.log(), 0.0)
    return old, rollout, mask, ratios


def broadcast(seq_weights, mask):
    return torch.where(mask, torch.tensor(seq_weights, dtype=torch.float64)[:, None].expand(mask.shape), 0.0)


def test_token_modes_closed_form():
    old, rollout, mask, r = example()
    tis = rollout_correction(old, rollout, mask, mode="tis")
    torch.testing.assert_close(tis.weights, torch.where(mask, r.clamp(max=2.0), 0.0))
    assert tis.metrics["correction/truncated_frac"].item() == pytest.approx(1 / 5)  # the 3.0
    mis = rollout_correction(old, rollout, mask, mode="mis")  # IcePop band [0.5, 5]: 0.4 dropped
    torch.testing.assert_close(mis.weights, torch.tensor([[1.5, 3.0, 0.0], [1.0, 1.02, 0.0]], dtype=torch.float64))
    assert mis.metrics["correction/masked_frac"].item() == pytest.approx(1 / 5)
    custom = rollout_correction(old, rollout, mask, mode="mis", low=0.9, high=1.6)
    torch.testing.assert_close(custom.weights, torch.tensor([[1.5, 0, 0], [1.0, 1.02, 0]], dtype=torch.float64))
    for mode in ("none", "bypass"):
        torch.testing.assert_close(rollout_correction(old, rollout, mask, mode=mode).weights, mask.double())


def test_sequence_modes_closed_form_product_and_geometric():
    old, rollout, mask, _ = example()
    prod = [1.5 * 3.0 * 0.4, 1.02]  # 1.8, 1.02
    geo = [1.8 ** (1 / 3), 1.02 ** (1 / 2)]  # 1.2164, 1.00995
    cases = {
        "seq_tis": [min(prod[0], 2.0), prod[1]],
        "seq_mis": [prod[0], prod[1]],  # both inside [0.5, 2]
        "geo_tis": geo,
        "geo_mis": [0.0, geo[1]],  # geo[0] outside [0.99, 1.01]
        "geo_reject": [0.0, 1.0],
    }
    for mode, seq_weights in cases.items():
        out = rollout_correction(old, rollout, mask, mode=mode)
        torch.testing.assert_close(out.weights, broadcast(seq_weights, mask), msg=mode)
    tight = rollout_correction(old, rollout, mask, mode="seq_tis", threshold=1.5)
    torch.testing.assert_close(tight.weights, broadcast([1.5, 1.02], mask))
    assert tight.metrics["correction/truncated_frac"].item() == pytest.approx(3 / 5)
    rejected = rollout_correction(old, rollout, mask, mode="geo_reject")
    assert rejected.metrics["correction/seq_masked_frac"].item() == 0.5
    assert rejected.metrics["correction/masked_frac"].item() == pytest.approx(3 / 5)


def test_opsm_drops_negative_advantage_responses_the_policy_drifted_from():
    old, rollout, mask, _ = example()
    # mean log(pi_rollout / pi_theta): response 0 drifted by 0.01 > 1e-4, response 1 by 0.
    logprobs = torch.where(mask, rollout - torch.tensor([[0.01], [0.0]], dtype=torch.float64), 0.0)
    for adv, expected in [([-1.0, -1.0], [0.0, 1.0]), ([1.0, -1.0], [1.0, 1.0])]:
        out = rollout_correction(old, rollout, mask, mode="opsm", logprobs=logprobs,
                                 advantages=torch.tensor(adv, dtype=torch.float64))
        torch.testing.assert_close(out.weights, broadcast(expected, mask))
    token_adv = torch.tensor([[-1.0, 1.0, -1.0], [-1.0, -1.0, 0.0]], dtype=torch.float64)
    out = rollout_correction(old, rollout, mask, mode="opsm", logprobs=logprobs, advantages=token_adv)
    torch.testing.assert_close(out.weights, torch.tensor([[0, 1, 0], [1, 1, 0]], dtype=torch.float64))
    loose = rollout_correction(old, rollout, mask, mode="opsm", logprobs=logprobs, delta=0.02,
                               advantages=torch.tensor([-1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(loose.weights, mask.double())


@pytest.mark.parametrize("mode", CORRECTION_MODES)
@pytest.mark.parametrize("pad", [math.inf, -math.inf, math.nan])
def test_padding_junk_changes_nothing(mode, pad):
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 0, 3])[:, None]
    rollout = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    old = rollout + 0.01 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    logprobs = old + 0.01 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0, -1.0, -0.5], dtype=torch.float64)
    extra = {"logprobs": logprobs, "advantages": adv} if mode == "opsm" else {}
    clean = rollout_correction(old, rollout, mask, mode=mode, **extra)

    def dirty(x):
        return torch.where(mask, x, torch.tensor(pad, dtype=torch.float64))
    if mode == "opsm":
        extra = {"logprobs": dirty(logprobs), "advantages": torch.where(mask.any(-1), adv, pad)}
    out = rollout_correction(dirty(old), dirty(rollout), mask, mode=mode, **extra)
    assert torch.equal(out.weights, clean.weights)
    assert bool((out.weights[~mask] == 0).all()) and bool((out.weights >= 0).all())
    assert not out.weights.requires_grad
    for key, value in clean.metrics.items():
        assert torch.isfinite(value) and torch.equal(out.metrics[key], value), key


@pytest.mark.parametrize("mode", CORRECTION_MODES)
def test_weights_and_metrics_do_not_depend_on_the_batch_split(mode):
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 1, 0, 4, 3])[:, None]
    rollout = -torch.rand(5, 6, generator=g, dtype=torch.float64) * 2
    old = rollout + 0.3 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    logprobs = old + 0.01 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    kw = (lambda s: {"logprobs": logprobs[s], "advantages": adv[s]}) if mode == "opsm" else (lambda s: {})
    whole = rollout_correction(old, rollout, mask, mode=mode, **kw(slice(None)))
    parts = [rollout_correction(old[s], rollout[s], mask[s], mode=mode, **kw(s)) for s in (slice(0, 2), slice(2, 5))]
    torch.testing.assert_close(torch.cat([p.weights for p in parts]), whole.weights, rtol=0, atol=0)
    reduced = reduce_metrics([p.metrics for p in parts], whole.reductions)
    for key, value in whole.metrics.items():
        torch.testing.assert_close(reduced[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_invalid_arguments_are_named():
    old, rollout, mask, _ = example()
    with pytest.raises(ValueError, match="one of"):
        rollout_correction(old, rollout, mask, mode="icepop")
    with pytest.raises(ValueError, match=r"'tis' takes \['threshold'\], not \['low'\]"):
        rollout_correction(old, rollout, mask, mode="tis", low=0.5)
    with pytest.raises(ValueError, match="low <= high"):
        rollout_correction(old, rollout, mask, mode="mis", low=3.0, high=2.0)
    with pytest.raises(ValueError, match="needs logprobs"):
        rollout_correction(old, rollout, mask, mode="opsm")
    with pytest.raises(ValueError, match="'opsm' only"):
        rollout_correction(old, rollout, mask, mode="tis", logprobs=old)
    with pytest.raises(ValueError, match=r"rollout_logprobs has shape \(2, 2\)"):
        rollout_correction(old, rollout[:, :2], mask, mode="tis")
    assert set(CORRECTION_DEFAULTS) == set(CORRECTION_MODES)


# --- the losses' correction keyword ----------------------------------------------------------------------

def loss_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 0, 3])[:, None]
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    lp = (old + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)).clamp(max=-1e-3).requires_grad_()
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    weights = torch.where(mask, torch.rand(4, 5, generator=g, dtype=torch.float64) * 2, 0.0)
    return lp, old, adv, mask, weights


def call(objective, *args, **kwargs):
    extra = {"max_length": 5} if objective.needs_max_length else {}
    return objective.loss(*args, **kwargs, **extra)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_unit_weights_are_bit_identical_to_no_correction(name):
    lp, old, adv, mask, _ = loss_batch()
    objective = OBJECTIVES[name]
    plain = call(objective, lp, old, adv, mask)
    ones = call(objective, lp, old, adv, mask, correction=torch.where(mask, 1.0, 0.0).double())
    explicit_none = call(objective, lp, old, adv, mask, correction=None)
    assert torch.equal(plain.loss, ones.loss) and torch.equal(plain.loss, explicit_none.loss)
    assert torch.equal(torch.autograd.grad(plain.loss, lp)[0], torch.autograd.grad(ones.loss, lp)[0])
    assert dict(plain.metrics.items()).keys() == dict(ones.metrics.items()).keys()


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_weights_multiply_the_surrogate_token_by_token_or_by_the_sequence_mean(name):
    """Token-level losses weight each token's surrogate; sequence-level ones (GSPO, LUSPO, GMPO) weight
    each response's surrogate by the mean weight of its tokens. Checked through linearity: with a weight
    that is constant per response the loss is the weighted sum of one-response losses."""
    lp, old, adv, mask, weights = loss_batch()
    objective = OBJECTIVES[name]
    seq_w = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    per_response = torch.where(mask, seq_w[:, None], 0.0)  # (B, T)
    out = call(objective, lp, old, adv, mask, correction=per_response, **{objective.normaliser: 10})
    expected = sum(seq_w[i] * call(objective, lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                                   **{objective.normaliser: 10}).loss for i in range(4))
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    # a token mask: zero weight on a token removes exactly that token (token-level) or scales (sequence-level)
    out = call(objective, lp, old, adv, mask, correction=weights)
    assert torch.isfinite(out.loss)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert bool((grad[~mask] == 0).all())


def test_gspo_uses_the_mean_token_weight_and_dapo_each_token_weight():
    lp, old, adv, mask, weights = loss_batch()
    lengths = mask.sum(-1).clamp_min(1).double()
    mean_w = torch.where(mask, weights, 0).sum(-1) / lengths  # (B,)
    s = torch.exp(torch.where(mask, lp.detach() - old, 0).sum(-1) / lengths)
    surrogate = torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    expected = -(torch.where(mask.any(-1), mean_w * surrogate, 0)).sum() / 3
    torch.testing.assert_close(gspo_loss(lp, old, adv, mask, correction=weights).loss, expected)
    w = torch.exp(lp.detach() - old)
    token = torch.minimum(w * adv[:, None], w.clamp(0.8, 1.28) * adv[:, None])
    expected = -torch.where(mask, weights * token, 0).sum() / mask.sum()
    torch.testing.assert_close(dapo_loss(lp, old, adv, mask, correction=weights).loss, expected)


def test_correction_end_to_end_with_a_loss_and_bad_weights_rejected():
    old, rollout, mask, _ = example()
    lp = old.clone().requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    c = rollout_correction(old, rollout, mask, mode="geo_reject")  # drops response 0
    out = dapo_loss(lp, old, adv, mask, correction=c.weights)
    assert out.loss.item() == pytest.approx(-(0 * 3 * 1.0 + 2 * -1.0) / 5)
    with pytest.raises(ValueError, match="finite and >= 0"):
        dapo_loss(lp, old, adv, mask, correction=-c.weights - 1)
    with pytest.raises(ValueError, match=r"correction has shape \(2, 2\)"):
        dapo_loss(lp, old, adv, mask, correction=c.weights[:, :2])
