"""KL estimators, DAPO overlong reward shaping (DAPO eq. 13) and the dynamic-sampling filter."""

from __future__ import annotations

import math

import pytest
import torch

from gspo import MAX_LOG_RATIO, groups_with_signal, kl_penalty, overlong_penalty


def test_kl_estimators_closed_form_and_padding():
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, float("inf")]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    d = torch.tensor([-0.5, 1.0], dtype=torch.float64)  # ref - logp on the two tokens
    expected = {"k1": -d, "k2": 0.5 * d**2, "k3": torch.exp(d) - d - 1}
    for name, values in expected.items():
        kl = kl_penalty(logprobs, ref, mask, name)
        torch.testing.assert_close(kl[0, :2], values)
        assert kl[0, 2].item() == 0.0
    kl = kl_penalty(logprobs, ref, mask).sum()  # k3: d/dlogp = 1 - exp(d)
    kl.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0]],
                                                           dtype=torch.float64))


def test_k3_is_nonnegative_and_zero_on_policy():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 16, generator=g) * 5
    ref = -torch.rand(64, 16, generator=g) * 5
    mask = torch.ones(64, 16, dtype=torch.bool)
    assert bool((kl_penalty(logprobs, ref, mask) >= 0).all())
    assert bool((kl_penalty(logprobs, logprobs, mask) == 0).all())
    assert bool((kl_penalty(logprobs, ref, mask, "k2") >= 0).all())


def test_kl_clamps_the_log_ratio():
    logprobs = torch.tensor([[-200.0]])
    kl = kl_penalty(logprobs, torch.tensor([[0.0]]), torch.ones(1, 1, dtype=torch.bool))
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(math.exp(MAX_LOG_RATIO) - MAX_LOG_RATIO - 1, rel=1e-6)


def test_kl_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(x, x, x.bool(), "k5")
    with pytest.raises(ValueError, match="same"):
        kl_penalty(x, torch.zeros(2, 4), x.bool())


def test_overlong_penalty_piecewise_and_boundaries():
    # max_len 20, cache 4: free up to 16, linear in (16, 20], -1 beyond 20
    lengths = torch.tensor([0, 15, 16, 17, 18, 19, 20, 21, 100])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=20, cache_len=4), expected)
    # no buffer: a hard cliff after max_len
    torch.testing.assert_close(overlong_penalty(torch.tensor([20, 21]), 20, 0), torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 20, 21)
    with pytest.raises(ValueError, match=r"lengths must be \(B,\)"):
        overlong_penalty(lengths.view(3, 3), 20, 4)


def test_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.6])
    assert groups_with_signal(rewards, 3).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="not a multiple"):
        groups_with_signal(rewards, 5)


class LengthEngine:
    """Answers prompt p with the scripted completions of p, in order (one per response of its group)."""

    info = None

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = scripts

    def generate(self, prompts, params, generator=None, *, row_seeds=None, record_routing=False):
        from gspo.rollout.base import Rollout

        seen: dict[str, int] = {}
        texts = []
        for p in prompts:
            key = "".join(map(chr, p))
            texts.append(self.scripts[key][seen.get(key, 0)])
            seen[key] = seen.get(key, 0) + 1
        width = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.bool)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor([ord(c) for c in t])
            mask[i, : len(t)] = True
        return Rollout(torch.ones(len(texts), 1, dtype=torch.long), torch.ones(len(texts), 1, dtype=torch.bool), ids,
                       mask, torch.zeros(len(texts), width), torch.zeros(len(texts), dtype=torch.bool))


def test_dynamic_sampling_filters_on_accuracy_before_the_overlong_penalty():
    # DAPO eq. 11 / verl filter_groups.metric=acc: a group whose answers are all right but whose lengths reach
    # into the overlong buffer differently carries no accuracy signal and is dropped
    from gspo.rollout.base import SamplingParams
    from gspo.tasks.rewards import WeightedReward
    from gspo.trainer.collect import Collector

    def right(prompt, completion, **row):
        return float(completion.strip() == row["answer"])

    scripts = {"a": ["1", "1       "], "b": ["2", "3"], "c": ["4", "5"]}  # "a": both right, one long
    rows = iter([[{"prompt": "a", "answer": "1"}], [{"prompt": "b", "answer": "2"}], [{"prompt": "c", "answer": "4"}]])
    collector = Collector(LengthEngine(scripts), lambda row: [ord(c) for c in row["prompt"]],
                          lambda ids: "".join(map(chr, ids)), [WeightedReward("right", right, 1.0)],
                          SamplingParams(max_new_tokens=8), group_size=2, overlong_buffer=4)
    batch = collector.collect_with_signal(lambda: (next(rows), 0), num_groups=2, seed=0)
    assert [r["prompt"] for r in batch.rows] == ["b", "b", "c", "c"]  # "a" dropped though its rewards differ
    assert batch.metrics["dapo/kept_group_frac"] == 2 / 3
