"""Implausible values get one warning each, never an error: the learning rate, a one-step KL, zero rewards."""

from __future__ import annotations

import pytest

from gspo.config import load_config
from gspo.trainer.plausibility import StepWatch, config_warnings
from gspo.trainer.trainer import ZERO_SIGNAL_STEPS, ZeroSignalWatch


@pytest.mark.parametrize("lr, fragment", [(1e5, "did you mean optim.lr=1e-5?"), (0.5, "far above"),
                                          (1e-12, "far below")])
def test_a_learning_rate_far_outside_rl_fine_tunings_range_warns(lr, fragment):
    warnings = config_warnings(load_config(None, [f"optim.lr={lr}"]))  # accepted: a warning, not an error
    assert len(warnings) == 1 and "optim.lr=" in warnings[0] and fragment in warnings[0]


@pytest.mark.parametrize("lr", [1e-4, 1e-6, 1e-3, 1e-8])
def test_plausible_learning_rates_say_nothing(lr):
    assert config_warnings(load_config(None, [f"optim.lr={lr}"])) == []


def test_a_kl_above_one_nat_in_one_step_warns_once():
    watch = StepWatch()
    assert watch.observe(1, {"kl/old_new": 2e-3}) is None
    warning = watch.observe(2, {"kl/old_new": 1.5})
    assert "kl/old_new=1.5 at step 2" in warning and "optim.lr" in warning
    assert watch.observe(3, {"kl/old_new": 3.0}) is None  # once


def test_rewards_exactly_zero_at_every_step_are_named_as_such():
    watch = ZeroSignalWatch()
    said = [watch.observe(1.0, 0.0) for _ in range(ZERO_SIGNAL_STEPS + 2)]
    assert said[:ZERO_SIGNAL_STEPS - 1] == [None] * (ZERO_SIGNAL_STEPS - 1) and said[ZERO_SIGNAL_STEPS:] == [None, None]
    assert "every reward was exactly 0" in said[ZERO_SIGNAL_STEPS - 1]
    same = ZeroSignalWatch()  # identical but non-zero rewards keep the general message
    assert "identical rewards" in [same.observe(1.0, 1.0) for _ in range(ZERO_SIGNAL_STEPS)][-1]
