"""Closed-form tests of the four objectives: the SPEC worked example, eq. 10, on-policy values,
clipping, global normalisers, metrics and input validation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from gspo import MAX_LOG_RATIO, dapo_loss, grpo_loss, gspo_loss, gspo_token_loss, kl_penalty, reduce_metrics

LOSSES = [gspo_loss, gspo_token_loss, grpo_loss, dapo_loss]
SEQUENCE_NORMALISED = {gspo_loss, gspo_token_loss, grpo_loss}


def normaliser_kwargs(loss_fn, mask: torch.Tensor) -> dict:
    """The global normaliser of `loss_fn` for the whole batch `mask`."""
    if loss_fn is dapo_loss:
        return {"num_tokens": int(mask.sum())}
    return {"num_sequences": int((mask.sum(-1) > 0).sum())}


def random_batch(seed: int, lengths: list[int], width: int, spread: float = 0.3):
    """float64 logprobs (leaf, requires grad), old_logprobs, advantages (B,), mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    old = -torch.rand(b, width, generator=g, dtype=torch.float64) * 3  # (B, T)
    logprobs = (old + spread * torch.randn(b, width, generator=g, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(b, generator=g, dtype=torch.float64)  # (B,)
    return logprobs, old, advantages, mask


# --- SPEC.md worked example: "Hello" "world", pi_old 0.20 / 0.10, pi_theta 0.25 / 0.30, eps = 0.2 ------

def hello_world(advantage: float):
    logprobs = torch.tensor([[0.25, 0.30]], dtype=torch.float64).log().requires_grad_()
    old = torch.tensor([[0.20, 0.10]], dtype=torch.float64).log()
    return logprobs, old, torch.tensor([advantage], dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool)


def test_worked_example_grpo_token_ratios_clip_to_1_2():
    logprobs, old, adv, mask = hello_world(+1.0)
    out = grpo_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert out.metrics["ratio/min"].item() == pytest.approx(1.25)
    assert out.metrics["ratio/max"].item() == pytest.approx(3.0)
    assert out.loss.item() == pytest.approx(-1.2)  # both tokens clipped to 1.2, mean over the 2 tokens
    out.loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2, dtype=torch.float64))  # both gradients zeroed
    assert out.metrics["loss/clip_frac_high"].item() == 1.0

    logprobs, old, adv, mask = hello_world(-1.0)  # mirror: A < 0 keeps the unclipped branch
    out = grpo_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx((1.25 + 3.0) / 2)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[1.25 / 2, 3.0 / 2]], dtype=torch.float64))
    assert out.metrics["loss/clip_frac"].item() == 0.0
    assert out.metrics["ratio/outside_band_frac"].item() == 1.0


def test_worked_example_gspo_uses_the_geometric_mean_not_the_product():
    logprobs, old, adv, mask = hello_world(+1.0)
    out = gspo_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    s = out.metrics["ratio/mean"].item()
    assert s == pytest.approx(math.sqrt(3.75)) and s == pytest.approx(1.9365, abs=1e-4)
    assert out.loss.item() == pytest.approx(-1.2)  # clipped to 1 + 0.2
    out.loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2, dtype=torch.float64))
    # With a band wide enough not to clip, the loss exposes the ratio itself: sqrt(3.75), never 3.75.
    unclipped = gspo_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=10.0).loss.item()
    assert unclipped == pytest.approx(-math.sqrt(3.75))
    assert unclipped != pytest.approx(-3.75)
    assert math.exp((logprobs - old).sum().item()) == pytest.approx(3.75)  # the product (misreading 1)


# --- GSPO eq. 10 and GSPO-token -------------------------------------------------------------------

def gspo_expected(logprobs, old, adv, mask, clip_low, clip_high, num_sequences):
    """Closed form: value and eq. 10 gradient, per response."""
    lengths = mask.sum(-1).double()
    s = torch.exp(torch.where(mask, logprobs.detach() - old, 0).sum(-1) / lengths)  # (B,)
    clipped = ((adv > 0) & (s > 1 + clip_high)) | ((adv < 0) & (s < 1 - clip_low))  # (B,)
    value = -torch.minimum(s * adv, s.clamp(1 - clip_low, 1 + clip_high) * adv).sum() / num_sequences
    per_token = torch.where(clipped, 0.0, -s * adv / lengths / num_sequences)  # (B,)
    grad = torch.where(mask, per_token[:, None].expand_as(mask), 0.0)  # (B, T)
    return value, grad, clipped


def test_gspo_gradient_is_eq_10():
    logprobs, old, adv, mask = random_batch(0, [5, 1, 7, 3, 6, 2], width=8, spread=0.05)
    value, grad, clipped = gspo_expected(logprobs, old, adv, mask, 0.01, 0.01, 6)
    assert 0 < int(clipped.sum()) < 6  # both cases are exercised
    out = gspo_loss(logprobs, old, adv, mask, clip_low=0.01, clip_high=0.01)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), value)
    torch.testing.assert_close(logprobs.grad, grad)


def test_gspo_token_equals_gspo_with_per_response_advantages():
    logprobs, old, adv, mask = random_batch(1, [4, 6, 1, 3], width=6, spread=0.05)
    a = gspo_loss(logprobs, old, adv, mask, clip_low=0.01, clip_high=0.01)
    (grad_a,) = torch.autograd.grad(a.loss, logprobs)
    for advantages in (adv, adv[:, None].expand(-1, 6)):  # (B,) and the same values as (B, T)
        b = gspo_token_loss(logprobs, old, advantages, mask, clip_low=0.01, clip_high=0.01)
        (grad_b,) = torch.autograd.grad(b.loss, logprobs)
        torch.testing.assert_close(b.loss, a.loss)
        torch.testing.assert_close(grad_b.sum(-1), grad_a.sum(-1))  # per-response gradient sum
        torch.testing.assert_close(grad_b, grad_a)  # in fact token by token
        assert b.metrics["loss/clip_frac"] == a.metrics["loss/clip_frac"]


def test_gspo_token_with_per_token_advantages_closed_form():
    logprobs, old, _, mask = random_batch(2, [4, 2, 5], width=5, spread=0.05)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)  # (B, T)
    lo = hi = 0.01
    lengths = mask.sum(-1).double()
    s = torch.exp(torch.where(mask, logprobs.detach() - old, 0).sum(-1) / lengths)[:, None]  # (B, 1)
    surrogate = torch.minimum(s * adv, s.clamp(1 - lo, 1 + hi) * adv)  # (B, T)
    value = -(torch.where(mask, surrogate, 0).sum(-1) / lengths).sum() / 3
    clipped = ((adv > 0) & (s > 1 + hi)) | ((adv < 0) & (s < 1 - lo))  # (B, T)
    grad = torch.where(mask & ~clipped, -s * adv / lengths[:, None] / 3, 0.0)  # (B, T)
    assert bool((clipped & mask).any()) and bool((~clipped & mask).any())
    out = gspo_token_loss(logprobs, old, adv, mask, clip_low=lo, clip_high=hi)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), value)
    torch.testing.assert_close(logprobs.grad, grad)
    # ...and differs from GSPO with the per-response mean advantage, which spreads it evenly.
    mean_adv = torch.where(mask, adv, 0).sum(-1) / lengths
    (grad_gspo,) = torch.autograd.grad(gspo_loss(logprobs, old, mean_adv, mask, clip_low=lo, clip_high=hi).loss,
                                       logprobs)
    assert not torch.allclose(grad_gspo, logprobs.grad)


# --- on-policy: every ratio is 1, nothing clips, loss = - aggregated advantage ------------------------

@pytest.mark.parametrize("loss_fn", LOSSES)
def test_on_policy_closed_form(loss_fn):
    logprobs, _, adv, mask = random_batch(4, [3, 1, 5, 2], width=5)
    old = logprobs.detach().clone()
    lengths = mask.sum(-1).double()
    out = loss_fn(logprobs, old, adv, mask)
    out.loss.backward()
    if loss_fn is dapo_loss:  # token-mean: each response weighs |y_i|
        expected = -(lengths * adv).sum() / lengths.sum()
        grad = torch.where(mask, -adv[:, None] / lengths.sum(), 0.0)
    else:  # seq-mean-token-mean: each response weighs 1
        expected = -adv.mean()
        grad = torch.where(mask, -adv[:, None] / lengths[:, None] / 4, 0.0)
    torch.testing.assert_close(out.loss.detach(), expected)
    torch.testing.assert_close(logprobs.grad, grad)
    assert out.metrics["ratio/min"].item() == out.metrics["ratio/max"].item() == 1.0
    assert out.metrics["loss/clip_frac"].item() == 0.0 and out.metrics["kl/old_new"].item() == 0.0


# --- clipping: zero gradient exactly when the clipped branch is the min -------------------------------

@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize(
    "advantage, ratio, zero_grad, side",
    [(+1.0, 1.5, True, "high"), (+1.0, 0.5, False, None), (-1.0, 0.5, True, "low"), (-1.0, 1.5, False, None)],
)
def test_clipping_zeroes_gradient_only_on_the_clipped_branch(loss_fn, advantage, ratio, zero_grad, side):
    logprobs = torch.full((1, 3), -1.0, dtype=torch.float64, requires_grad=True)
    old = logprobs.detach() - math.log(ratio)  # every token ratio (and the sequence ratio) = `ratio`
    out = loss_fn(logprobs, old, torch.tensor([advantage], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool))
    out.loss.backward()
    assert bool((logprobs.grad == 0).all()) == zero_grad
    assert bool((logprobs.grad != 0).all()) == (not zero_grad)
    assert out.metrics["loss/clip_frac_high"].item() == (1.0 if side == "high" else 0.0)
    assert out.metrics["loss/clip_frac_low"].item() == (1.0 if side == "low" else 0.0)
    assert out.metrics["ratio/outside_band_frac"].item() == 1.0


def test_gspo_clip_fractions_are_token_weighted_and_per_sequence():
    # response 0 (3 tokens): s = 1.5, A > 0 -> clipped; response 1 (1 token): s = 1.5, A < 0 -> not.
    logprobs = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    old = torch.full((2, 3), -math.log(1.5), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = gspo_loss(logprobs, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask)
    assert out.metrics["loss/clip_frac"].item() == pytest.approx(3 / 4)
    assert out.metrics["loss/seq_clip_frac"].item() == pytest.approx(1 / 2)
    assert out.metrics["ratio/outside_band_frac"].item() == 1.0
    assert out.metrics["count/tokens"].item() == 4 and out.metrics["count/sequences"].item() == 2


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_huge_log_ratio_is_clamped_not_overflowed(loss_fn):
    # log-ratio 100 on the one token: exp(100) overflows float32; A < 0 keeps the unclipped branch.
    logprobs = torch.tensor([[0.0]], requires_grad=True)
    out = loss_fn(logprobs, torch.tensor([[-100.0]]), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.exp(MAX_LOG_RATIO), rel=1e-6)
    assert logprobs.grad.item() == 0.0  # the clamp stops this outlier's gradient
    assert all(torch.isfinite(v) for v in out.metrics.values())


# --- global normalisers: splitting the batch changes nothing -----------------------------------------

@pytest.mark.parametrize("loss_fn", LOSSES)
def test_batch_split_reproduces_loss_gradient_and_metrics(loss_fn):
    lengths = [3, 0, 7, 1, 5, 2, 6]
    logprobs, old, adv, mask = random_batch(5, lengths, width=7)
    ref = old + 0.1
    kwargs = dict(normaliser_kwargs(loss_fn, mask), ref_logprobs=ref, beta=0.05)
    whole = loss_fn(logprobs, old, adv, mask, **kwargs)
    (whole_grad,) = torch.autograd.grad(whole.loss, logprobs)

    parts, total = [], 0.0
    grad = torch.zeros_like(whole_grad)
    for start, stop, width in [(0, 2, 3), (2, 3, 7), (3, 7, 7)]:  # different padding widths
        rows = slice(start, stop)
        part_logprobs = logprobs.detach()[rows, :width].clone().requires_grad_()
        out = loss_fn(part_logprobs, old[rows, :width], adv[rows], mask[rows, :width],
                      **{**kwargs, "ref_logprobs": ref[rows, :width]})
        (part_grad,) = torch.autograd.grad(out.loss, part_logprobs)
        grad[rows, :width] = part_grad
        total = total + out.loss.detach()
        parts.append(out.metrics)
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-12)
    reduced = reduce_metrics(parts, whole.reductions)
    assert reduced.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        torch.testing.assert_close(reduced[key], value.double(), rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_kl_term_uses_the_loss_aggregation(loss_fn):
    logprobs, old, adv, mask = random_batch(6, [2, 5, 3], width=5)
    ref = old - 0.2
    plain = loss_fn(logprobs, old, adv, mask)
    out = loss_fn(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.1)
    k3 = kl_penalty(logprobs, ref, mask)  # (B, T)
    lengths = mask.sum(-1).double()
    expected_kl = k3.sum() / lengths.sum() if loss_fn is dapo_loss else (k3.sum(-1) / lengths).mean()
    torch.testing.assert_close(out.metrics["loss/kl"], expected_kl.detach())
    torch.testing.assert_close(out.loss, plain.loss + 0.1 * expected_kl)
    assert "loss/kl" not in plain.metrics


# --- validation --------------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    import inspect
    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k.startswith("clip")}
    assert defaults(gspo_loss) == defaults(gspo_token_loss) == {"clip_low": 3e-4, "clip_high": 4e-4}
    assert defaults(grpo_loss) == {"clip_low": 0.2, "clip_high": 0.2}
    assert defaults(dapo_loss) == {"clip_low": 0.2, "clip_high": 0.28}


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_invalid_inputs_raise_clear_errors(loss_fn):
    logprobs, old, adv, mask = random_batch(7, [2, 3], width=3)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 4\)"):
        loss_fn(logprobs, torch.zeros(2, 4, dtype=torch.float64), adv, mask)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\)"):
        loss_fn(logprobs, old, adv, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
        loss_fn(logprobs, old, torch.zeros(3, dtype=torch.float64), mask)
    with pytest.raises(ValueError, match="clip_low"):
        loss_fn(logprobs, old, adv, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match="clip_high"):
        loss_fn(logprobs, old, adv, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        loss_fn(logprobs, old, adv, mask * 0.5)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        loss_fn(logprobs, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        loss_fn(logprobs, old, adv, mask, ref_logprobs=old, kl_estimator="k4")
    name = "num_tokens" if loss_fn is dapo_loss else "num_sequences"
    with pytest.raises(ValueError, match=f"{name}=1 is smaller"):
        loss_fn(logprobs, old, adv, mask, **{name: 1})
    if loss_fn is gspo_token_loss:
        assert torch.isfinite(loss_fn(logprobs, old, torch.zeros(2, 3, dtype=torch.float64), mask).loss)
    else:
        with pytest.raises(ValueError, match=r"advantages has shape \(2, 3\), expected \(2,\)"):
            loss_fn(logprobs, old, torch.zeros(2, 3, dtype=torch.float64), mask)


def test_mask_as_0_1_integers_equals_bool_mask():
    logprobs, old, adv, mask = random_batch(8, [2, 3], width=3)
    for loss_fn in LOSSES:
        torch.testing.assert_close(loss_fn(logprobs, old, adv, mask.long()).loss,
                                   loss_fn(logprobs, old, adv, mask).loss)


def test_docs_snippet_runs():
    text = (Path(__file__).resolve().parents[2] / "docs" / "objectives.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "docs/objectives.md", "exec"), namespace)
    torch.testing.assert_close(namespace["whole"]["loss/policy"], namespace["out"].loss.double(),
                               rtol=1e-5, atol=1e-6)
    assert namespace["whole"]["count/sequences"].item() == 4


def test_metric_keys_and_reductions_are_the_documented_ones():
    common = {"count/tokens": "sum", "count/sequences": "sum", "count/out_of_support_tokens": "sum",
              "loss/policy": "sum",
              "loss/clip_frac": "mean/tokens", "loss/clip_frac_low": "mean/tokens",
              "loss/clip_frac_high": "mean/tokens", "ratio/outside_band_frac": "mean/tokens",
              "logratio/token_mean": "mean/tokens", "logratio/token_std": "std/tokens",
              "logratio/seq_mean": "mean/sequences", "logratio/seq_std": "std/sequences",
              "kl/old_new": "mean/tokens", "loss/kl": "sum", "kl/ref": "mean/tokens"}
    per_sequence = {"ratio/mean": "mean/sequences", "ratio/min": "min/sequences",
                    "ratio/max": "max/sequences", "loss/seq_clip_frac": "mean/sequences"}
    per_token = {"ratio/mean": "mean/tokens", "ratio/min": "min/tokens", "ratio/max": "max/tokens"}
    logprobs, old, adv, mask = random_batch(9, [2, 3], width=3)
    for loss_fn in LOSSES:
        out = loss_fn(logprobs, old, adv, mask, ref_logprobs=old)
        expected = {**common, **(per_token if loss_fn in (grpo_loss, dapo_loss) else per_sequence)}
        assert dict(out.reductions) == expected, loss_fn.__name__
        assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    with pytest.raises(ValueError, match="at least one part"):
        reduce_metrics([], expected)
