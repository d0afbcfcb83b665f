"""A sampled token outside the trainer's top-k / top-p support (review D8).

A bfloat16 (or vLLM) sampler can keep a boundary token that the trainer's float32 nucleus drops: with
probabilities [0.5, 0.4, 0.1] and top_p 0.9, logits rounded through bfloat16 give [0.5005, 0.3990,
0.1005] (the first two sum below 0.9: token 2 kept), float32 gives [0.5, 0.4, 0.1] (token 2 dropped). The
trainer's log-probability of that token is -inf, on both sides of the ratio when pi_old is recomputed.
Such tokens are left out of every loss, correction and mismatch metric, and counted.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from gspo.algorithms import OBJECTIVES, get_objective, rollout_correction
from gspo.logprobs import truncated_log_softmax
from gspo.trainer.old_logprobs import mismatch_metrics
from gspo.trainer.policy import PolicyLogprobs
from gspo.trainer.update import UpdateInputs, Updater

PROBS, TOP_P, PROMPT, T = [0.5, 0.4, 0.1], 0.9, 3, 6
# (B, T) completions: token 2 (kept by the bf16 sampler only) at three positions; -1 = padding
COMPLETIONS = [[0, 1, 2, 0, -1, -1], [1, 1, 0, 1, 0, 1], [2, 0, 1, -1, -1, -1], [0, 2, 1, 1, 0, -1]]


def policy_model() -> PolicyLogprobs:
    """A tiny Qwen3 whose next-token distribution is exactly PROBS at every position (zero head weight,
    bias log PROBS); the weight and the bias still get gradients."""
    config = transformers.Qwen3Config(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    head = torch.nn.Linear(16, 3, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(PROBS).log())
    model.lm_head = head
    return PolicyLogprobs(model, top_p=TOP_P)


def batch():
    """(ids, attention, completion mask, the bf16 sampler's (B, T) log-probabilities)."""
    completions = torch.tensor(COMPLETIONS)  # (B, T)
    mask = completions >= 0  # (B, T)
    ids = torch.cat([torch.zeros(len(completions), PROMPT, dtype=torch.long), completions.clamp_min(0)], 1)
    attention = torch.cat([torch.ones(len(completions), PROMPT, dtype=torch.bool), mask], 1)
    # the bfloat16 engine: logits rounded to bfloat16, then upcast and truncated (gspo.rollout.hf)
    sampler = truncated_log_softmax(torch.tensor(PROBS).log().bfloat16().float(), 0, TOP_P)  # (V,)
    assert bool(torch.isfinite(sampler).all())  # the bf16 sampler keeps token 2
    return ids, attention, mask, torch.where(mask, sampler[completions.clamp_min(0)], 0.0)


def test_the_reviews_example_is_out_of_the_float32_support():
    policy = policy_model()
    ids, attention, mask, sampler = batch()
    with torch.no_grad():
        trainer = policy(ids, attention, T)  # (B, T)
    out = mask & (ids[:, -T:] == 2)
    assert int(out.sum()) == 3 and bool(torch.isneginf(trainer[out]).all())
    assert bool(torch.isfinite(trainer[mask & ~out]).all()) and bool(torch.isfinite(sampler).all())
    metrics = mismatch_metrics(trainer, sampler, mask)
    assert all(math.isfinite(v) for v in metrics.values()), metrics  # was inf / NaN
    assert metrics["mismatch/out_of_support_tokens"] == 3.0
    from gspo.algorithms import in_support

    assert torch.equal(in_support(mask, trainer, sampler), mask & ~out)


def _loss(name, logprobs, old, mask, ref, n):
    objective = get_objective(name)
    extra = {"max_length": T} if objective.needs_max_length else {}
    return objective.loss(logprobs, old, torch.tensor([1.0, -0.5, 0.7, -1.2]), mask, ref_logprobs=ref,
                          beta=0.04, **extra, **{objective.normaliser: n})


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_an_out_of_support_token_contributes_nothing_to_any_loss(name):
    """-inf on both sides (recomputed pi_old, and the reference): finite loss and gradient, equal in value
    and gradient to the same loss with the token removed from the mask (same global normaliser), counted.
    For the sequence-level losses (GSPO, GMPO, LUSPO...) the response keeps its other tokens and its length
    is the kept count: the length-normalised ratio is the geometric mean over the tokens in support."""
    policy = policy_model()
    ids, attention, mask, _ = batch()
    out = mask & (ids[:, -T:] == 2)
    with torch.no_grad():
        old = policy(ids, attention, T) + 0.01 * torch.arange(T)  # (B, T) -inf at `out`; ratio != 1 elsewhere
    n = float(mask.sum()) if get_objective(name).normaliser == "num_tokens" else float(mask.any(1).sum())

    def run(mask_used, fill_out):
        policy.zero_grad()
        logprobs = policy(ids, attention, T)  # (B, T) -inf at `out`
        if fill_out:  # what the masked token holds must not matter: any finite junk
            logprobs = torch.where(out, logprobs.detach().nan_to_num(neginf=-3.0), logprobs)
        olds = old.nan_to_num(neginf=-5.0) if fill_out else old
        result = _loss(name, logprobs, olds, mask_used, olds, n)
        result.loss.backward()
        return result, [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    masked, grads = run(mask, fill_out=False)
    removed, expected = run(mask & ~out, fill_out=True)
    assert math.isfinite(float(masked.loss.detach())) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(math.isfinite(float(v)) for v in masked.metrics.values()), masked.metrics
    assert float(masked.metrics["count/out_of_support_tokens"]) == 3.0
    torch.testing.assert_close(masked.loss, removed.loss, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["recompute", "rollout"])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_training_steps_stay_finite_with_out_of_support_tokens(name, source):
    """The trainer's step (Updater: forward, loss, backward, clip, step) with the bf16 sampler's tokens:
    pi_old recomputed (-inf on both sides) or the sampler's own (finite pi_old, -inf pi_theta). Before,
    every loss was NaN, and cispo / gmpo / dppo skipped the step (TrainingDiverged after three)."""
    policy = policy_model()
    ids, attention, mask, sampler = batch()
    with torch.no_grad():
        recomputed = policy(ids, attention, T)
    old = recomputed if source == "recompute" else sampler
    inputs = UpdateInputs(ids, attention, mask, torch.tensor([1.0, -0.5, 0.7, -1.2]), old.clone(),
                          recomputed.clone(), rollout_logprobs=sampler)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    updater = Updater(algorithm=name, max_length=T, beta=0.04, minibatches=2, epochs=2)
    before = [p.detach().clone() for p in policy.parameters()]
    history = updater.update(policy, optimizer, scheduler, inputs, torch.Generator().manual_seed(0))
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["optim/skipped"] == 0.0
    assert sum(m["count/out_of_support_tokens"] for m in history) == 2 * 3  # each token once per epoch
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters()))


@pytest.mark.parametrize("mode", ["tis", "geo_tis", "seq_mis", "opsm"])
def test_corrections_leave_out_of_support_tokens_out(mode):
    """A -inf pi_old (recomputed) against the sampler's finite log-probability: weight 0 on that token, and
    the response's sequence ratio taken over its other tokens (as if the token were not in the mask)."""
    _, _, mask, sampler = batch()
    out = torch.zeros_like(mask)
    out[0, 2] = True
    old = torch.where(out, float("-inf"), sampler + 0.01)  # (B, T)
    opsm = {"logprobs": old, "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2])} if mode == "opsm" else {}
    got = rollout_correction(old, sampler, mask, mode=mode, **opsm)
    want = rollout_correction(old.nan_to_num(neginf=0.0), sampler, mask & ~out, mode=mode,
                              **{**opsm, "logprobs": old.nan_to_num(neginf=0.0)} if opsm else {})
    assert float(got.weights[0, 2]) == 0.0
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=0)
    assert all(math.isfinite(float(v)) for v in got.metrics.values()), got.metrics
