"""group_advantages (GSPO paper eq. 6): closed-form values, equal-reward groups, scale variants, errors."""

from __future__ import annotations

import math

import pytest
import torch

from gspo import group_advantages

EPS = 1e-6


def test_group_scale_closed_form():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])  # two groups of 3
    adv = group_advantages(rewards, 3)
    # group 1: mean 1/3, sample std sqrt(1/3); group 2: mean 7/3, sample std sqrt(7/3)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(7 / 3)
    expected = torch.tensor([(2 / 3) / (s1 + EPS), (-1 / 3) / (s1 + EPS), (-1 / 3) / (s1 + EPS),
                             (-4 / 3) / (s2 + EPS), (-1 / 3) / (s2 + EPS), (5 / 3) / (s2 + EPS)])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(adv.view(2, 3).sum(-1), torch.zeros(2), atol=1e-6, rtol=0)


def test_binary_group_of_two_is_plus_minus_one_over_sqrt2():
    # sample std of {0, 1} is 1/sqrt(2), deviations +-1/2 -> +-1/sqrt(2) (Bessel matters: population std gives +-1)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]) / math.sqrt(2))


def test_equal_reward_groups_give_exact_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 0.0], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 3, scale=scale)
        assert torch.equal(adv[:6], torch.zeros(6, dtype=torch.float64)), scale
        assert bool((adv[6:] != 0).all()), scale


def test_batch_and_none_scales():
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0], dtype=torch.float64)
    centred = torch.tensor([0.5, -0.5, -1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none"), centred)
    batch_std = rewards.std()  # sample std of all four rewards
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), centred / (batch_std + EPS))


def test_dtypes():
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2),
                               torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + EPS))


def test_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 2, scale="token")
    with pytest.raises(ValueError, match=r"rewards must be \(N,\)"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


def test_batch_scale_from_moments_of_shards_equals_the_whole_batch():
    # Under data parallelism each process holds some groups; "batch" scale must divide by the std of the
    # whole batch, which the summed (count, sum, sum of squares) of the shards give exactly.
    from gspo.algorithms.advantages import batch_std_from_moments, reward_moments

    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=gen) * 3 - 1  # 6 groups of 4
    whole = group_advantages(rewards, 4, scale="batch")
    shards = rewards.split(8)  # 3 processes, 2 groups each
    std = batch_std_from_moments(sum(reward_moments(s) for s in shards))
    torch.testing.assert_close(std, rewards.double().std(), rtol=1e-12, atol=0)
    split = torch.cat([group_advantages(s, 4, scale="batch", batch_std=std) for s in shards])
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    # without the global std, one process's share gives other advantages (what the bug did)
    local = torch.cat([group_advantages(s, 4, scale="batch") for s in shards])
    assert not torch.allclose(local, whole, rtol=1e-3)


def test_turn_group_advantages_turn_zero_is_eq6_and_absent_turns_are_zero():
    from gspo.algorithms.advantages import turn_group_advantages

    gen = torch.Generator().manual_seed(0)
    returns = torch.randn(8, 3, generator=gen, dtype=torch.float64)  # two groups of 4, up to 3 turns
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]] * 2, dtype=torch.bool)
    for scale in ("group", "batch", "none"):
        out = turn_group_advantages(returns, present, 4, scale=scale)
        assert out.dtype == torch.float64 and (out[~present] == 0).all()
        torch.testing.assert_close(out[:, 0], group_advantages(returns[:, 0], 4, scale=scale))
    # turn 1 of group 0: episodes 0, 1 and 3 reached it; the baseline is their mean, the scale their std
    g = returns[[0, 1, 3], 1]
    out = turn_group_advantages(returns, present, 4)
    torch.testing.assert_close(out[[0, 1, 3], 1], (g - g.mean()) / (g.std() + EPS))


def test_turn_group_advantages_flat_turns_and_errors():
    from gspo.algorithms.advantages import turn_group_advantages

    returns = torch.tensor([[1.0, 0.3], [1.0, 0.3], [0.0, 0.3], [2.0, 5.0]])  # one group of 4
    present = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    out = turn_group_advantages(returns, present, 4)
    assert (out[:, 1] == 0).all()  # turn 1's returns are equal over the episodes that reached it
    with pytest.raises(ValueError, match="scale"):
        turn_group_advantages(returns, present, 4, scale="std")
    with pytest.raises(ValueError, match="alike"):
        turn_group_advantages(returns, present[:, :1], 4)
    with pytest.raises(ValueError, match="multiple"):
        turn_group_advantages(returns, present, 3)
