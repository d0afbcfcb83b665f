"""Token-budget micro-batches: the split, its invariance, and pi_old from the same composition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from batch_helpers import padded_batch

from gspo.config.schema import Config
from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3
from gspo.trainer.micro import (_balanced, _greedy, _length_order, forward_overhead_tokens, padded_tokens, row_lengths,
                               split_minibatch, trim_padding)
from gspo.trainer.old_logprobs import OldLogprobPlan, OldLogprobs
from gspo.trainer.policy import PolicyLogprobs
from gspo.trainer.update import Updater, UpdateInputs

P, T = 6, 12  # prompt and completion widths of the test batch


def _batch(rows: int = 12, seed: int = 0, vocab: int = 18):
    """Prompts of 2..6 tokens, responses of 1..12 tokens (batch_helpers.padded_batch)."""
    return padded_batch(rows, P, T, seed=seed, vocab=vocab)


def test_token_split_covers_every_row_once_within_the_budget():
    _, attention, _ = _batch(rows=32)
    prompt, completion = row_lengths(attention, T)
    for budget in (1, 16, 40, 100, 10_000):
        pieces = split_minibatch(attention, T, tokens=budget)
        rows = torch.cat(pieces)
        assert sorted(rows.tolist()) == list(range(32))
        assert all(len(p) == 1 or padded_tokens(p, prompt, completion) <= budget for p in pieces)
        assert completion[rows].tolist() == sorted(completion.tolist(), reverse=True)  # length-sorted
    assert len(split_minibatch(attention, T, tokens=10_000)) == 1
    assert len(split_minibatch(attention, T, tokens=1)) == 32  # a response over the budget runs alone


def test_row_mode_is_unchanged():
    _, attention, _ = _batch(rows=8)
    assert [p.tolist() for p in split_minibatch(attention, T, rows=3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.tolist() for p in split_minibatch(attention, T)] == [list(range(8))]


def _cost(pieces, prompt, completion, overhead):
    return sum(padded_tokens(p, prompt, completion) + overhead for p in pieces)


@pytest.mark.parametrize("seed", range(6))
def test_padding_mode_is_the_least_cost_length_sorted_split(seed):
    # exact against every way of cutting the length-sorted order (2^(b-1) of them), with and without a budget
    import itertools

    rows = 9
    _, attention, _ = _batch(rows=rows, seed=seed)
    prompt, completion = row_lengths(attention, T)
    order = _length_order(prompt, completion)
    for overhead, budget in [(1, 0), (8, 0), (30, 0), (8, 40), (1000, 0)]:
        pieces = split_minibatch(attention, T, overhead=overhead, tokens=budget)
        assert torch.equal(torch.cat(pieces), order)  # every row once, longest first
        assert all(len(p) == 1 or padded_tokens(p, prompt, completion) <= (budget or 10**9) for p in pieces)
        best = min(
            _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, rows))], prompt, completion, overhead)
            for k in range(rows) for cuts in itertools.combinations(range(1, rows), k)
            if not budget or all(b - a == 1 or padded_tokens(order[a:b], prompt, completion) <= budget
                                 for a, b in zip((0, *cuts), (*cuts, rows))))
        assert _cost(pieces, prompt, completion, overhead) == best
        if budget:  # never worse than the greedy packing it replaces
            assert best <= _cost(_greedy(order, prompt, completion, budget), prompt, completion, overhead)
    assert len(split_minibatch(attention, T, overhead=10**6)) == 1  # a forward dearer than any padding: one
    assert [len(p) for p in split_minibatch(attention, T, overhead=10**6, rows=4)] == [4, 4, 1]  # rows win


def test_forward_overhead_keeps_tiny_models_whole_and_splits_real_ones():
    assert forward_overhead_tokens(1_000_000) > 300  # the embedded model: one micro-batch unless much padding
    assert forward_overhead_tokens(596_000_000) == 257  # Qwen3-0.6B: a forward costs ~256 tokens whatever its size


def test_balanced_split_gives_exactly_the_count_asked():
    # under data parallelism every process runs the largest count over the processes
    _, attention, _ = _batch(rows=10)
    prompt, completion = row_lengths(attention, T)
    order = _length_order(prompt, completion)
    for count in range(1, 11):
        pieces = _balanced(order, prompt, completion, count)
        assert len(pieces) == count and sorted(torch.cat(pieces).tolist()) == list(range(10))


def test_trim_leaves_no_all_padding_column():
    ids, attention, _ = _batch(rows=12)
    for piece in split_minibatch(attention, T, tokens=40):
        columns, kept = trim_padding(attention[piece], T)
        cut = attention[piece][:, columns]
        assert cut.any(dim=0).all() and cut.shape[1] - kept == int(row_lengths(attention[piece], T)[0].max())


def _updater(**kw) -> Updater:
    hyper = {**Config(algorithm="gspo").hyperparameters, "clip_low": 0.2, "clip_high": 0.2}
    return Updater("gspo", hyper, minibatches=kw.pop("minibatches", 1), max_grad_norm=0.0, **kw)


def _model(dtype):
    model = build_tiny_qwen3(build_char_tokenizer(), seed=0).to(dtype)
    model.config.use_cache = False
    return model


def _gradient(policy, inputs: UpdateInputs, updater: Updater) -> tuple[float, list[torch.Tensor]]:
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    plan = updater.plan(torch.Generator().manual_seed(0), len(inputs.advantages))  # one minibatch: the whole batch
    seen = []  # the gradient as the step sees it (the updater frees it once applied)
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in policy.parameters()]))
    history = updater.update(policy, optimizer, scheduler, inputs, plan=plan)
    return history[0]["loss/policy"], seen[0]


@pytest.mark.parametrize("mode", [{"micro_batch_tokens": 40}, {"forward_overhead": 4}])
def test_token_budget_micro_batches_give_the_one_shot_loss_and_gradient_in_float64(mode):
    ids, attention, mask = _batch(rows=12)
    policy = PolicyLogprobs(_model(torch.float64))
    with torch.no_grad():
        current = policy(ids, attention, T)  # (B, T)
    g = torch.Generator().manual_seed(1)
    old = (current + 0.02 * torch.randn(current.shape, generator=g, dtype=torch.float64)) * mask  # ratios != 1
    inputs = UpdateInputs(ids, attention, mask, torch.randn(12, generator=g, dtype=torch.float64), old, None)
    widths = []
    budgeted = _updater(**mode, on_logprobs=lambda lp, *_: widths.append(lp.shape))
    loss_split, grads_split = _gradient(policy, inputs, budgeted)
    loss_one, grads_one = _gradient(policy, inputs, _updater())
    assert len(widths) > 3 and any(w[1] < T for w in widths)  # several micro-batches, cut to their own width
    assert loss_split == pytest.approx(loss_one, rel=1e-12, abs=1e-14)
    for a, b in zip(grads_split, grads_one):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", [{"micro_batch_tokens": 40}, {"micro_batch_size": 3}, {"forward_overhead": 4}])
def test_old_logprobs_from_the_update_s_own_micro_batches_make_the_ratio_exactly_one_in_bfloat16(mode):
    # pi_old computed per micro-batch of the update (same rows, same width, same kernels, same autocast): with
    # the policy unchanged (lr 0), every minibatch's log-ratio is exactly 0 under bfloat16 compute.
    ids, attention, mask = _batch(rows=16, seed=3)
    policy = PolicyLogprobs(_model(torch.float32))
    updater = _updater(minibatches=2, autocast_dtype=torch.bfloat16, **mode)
    plan_ = OldLogprobPlan(source="recompute", setting="recompute", reason="test")
    passes = OldLogprobs(plan_, policy=lambda i, a, t, routed=False: policy(i, a, t), micro_batches=updater.micro_batches,
                         trim=updater.trims)
    rollout = SimpleNamespace(input_ids=ids, attention_mask=attention, completion_ids=ids[:, P:], completion_mask=mask,
                              logprobs=torch.zeros(mask.shape), routing=None)
    plan = updater.plan(torch.Generator().manual_seed(0), 16)  # one epoch of 2 minibatches
    with updater.autocast("cpu"):
        inputs, _ = passes(SimpleNamespace(rollout=rollout, advantages=torch.randn(16)), minibatches=plan[0])
    seen = []
    updater.on_logprobs = lambda lp, old, m: seen.append((lp.float() * m, old * m))
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    updater.update(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), inputs,
                   plan=plan)
    assert len(seen) >= 4
    for logprobs, old in seen:
        assert torch.equal(logprobs, old)


def test_trainer_with_a_token_budget_trains_like_one_shot(tiny_overrides):
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    a = Trainer.from_config(load_config(None, tiny_overrides), run_dir=None)
    b = Trainer.from_config(load_config(None, [*tiny_overrides, "optim.micro_batch_tokens=24",
                                               "loss.old_logprobs=recompute"]), run_dir=None)
    for trainer in (a, b):  # the runs differ by float rounding: Adam's default eps (1e-8) would turn that noise
        for group in trainer.parts.optimizer.param_groups:  # in a near-zero gradient element into a full step
            group["eps"] = 1e-4
    for _ in range(2):
        a.train_step(), b.train_step()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_padding_mode_is_for_models_of_50m_parameters_and_up():
    from gspo.trainer.build import _forward_overhead

    assert _forward_overhead(build_tiny_qwen3(build_char_tokenizer(), seed=0)) == 0  # the embedded model: as before
    with torch.device("meta"):  # no storage: only the parameter count matters
        big = torch.nn.Linear(8192, 8192)  # 67M parameters
    assert _forward_overhead(big) == forward_overhead_tokens(8192 * 8192 + 8192) > 0


def test_gradients_are_freed_once_applied_not_held_into_the_next_rollout():
    """After an update no parameter holds a gradient: a batch's last one would otherwise stay through the next
    rollout beside the sampler's weights (2.4 GB at the Qwen3-0.6B shape); each step still saw its own."""
    ids, attention, mask = _batch(rows=8)
    policy = PolicyLogprobs(_model(torch.float64))
    with torch.no_grad():
        old = policy(ids, attention, T)  # (B, T)
    inputs = UpdateInputs(ids, attention, mask, torch.linspace(-1, 1, 8, dtype=torch.float64), old, None)
    updater = _updater(minibatches=2)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    stepped = []
    optimizer.register_step_pre_hook(lambda *_: stepped.append(all(p.grad is not None for p in policy.parameters())))
    plan = updater.plan(torch.Generator().manual_seed(0), 8)  # one epoch of 2 minibatches
    updater.update(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), inputs, plan=plan)
    assert stepped == [True, True]
    assert all(p.grad is None for p in policy.parameters())
