"""Every registered objective and rollout correction runs in the same trainer loop (docs/objectives.md)."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.algorithms import OBJECTIVES, CORRECTION_MODES
from gspo.config import load_config
from gspo.trainer.trainer import Trainer


def _trainer(overrides, *extra) -> Trainer:
    return Trainer.from_config(load_config(None, [*overrides, *extra]), None)


@pytest.mark.parametrize("algorithm", sorted(OBJECTIVES))
def test_every_objective_trains_a_step(tiny_overrides, algorithm):
    trainer = _trainer(tiny_overrides, f"algorithm={algorithm}", "loss.dynamic_sampling=false")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss/total"] if "loss/total" in metrics else metrics["loss/policy"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_dr_grpo_trains_on_unscaled_advantages(tiny_overrides):
    # Dr. GRPO's advantages are r - mean(group r), without eq. 6's std division (arXiv 2503.20783)
    trainer = _trainer(tiny_overrides, "algorithm=dr_grpo")
    batch = trainer.collector.collect(trainer.task.eval_rows[:2], seed=0)
    expected = batch.rewards.view(-1, 4) - batch.rewards.view(-1, 4).mean(-1, keepdim=True)
    assert trainer.collector.advantage_scale == "none"
    assert torch.allclose(batch.advantages, expected.view(-1), atol=1e-6)


def test_objective_hyperparameters_reach_the_loss(tiny_overrides):
    trainer = _trainer(tiny_overrides, "algorithm=sapo", "loss.params=tau_neg=2.5")
    assert trainer.updater.hyperparameters == {"tau_pos": 1.0, "tau_neg": 2.5}
    assert trainer.config.resolved_dict()["loss"]["clip_low"] is None  # SAPO has no clip range


@pytest.mark.parametrize("mode", [m for m in CORRECTION_MODES if m not in ("none", "bypass")])
def test_every_rollout_correction_runs_against_a_bfloat16_sampler(tiny_overrides, mode):
    # a bfloat16 sampler: the engine's log-probabilities differ from the recomputed pi_old (a real mismatch)
    trainer = _trainer(tiny_overrides, "rollout.engine_dtype=bfloat16", f"correction.mode={mode}")
    assert trainer.old_logprobs_plan.source == "recompute"
    metrics = trainer.train_step()
    keys = [k for k in metrics if k.startswith("correction/")]
    assert keys, f"no correction/* metric for {mode}"
    assert all(math.isfinite(metrics[k]) for k in keys)


def test_bypass_is_pi_old_from_the_engine(tiny_overrides):
    trainer = _trainer(tiny_overrides, "rollout.engine_dtype=bfloat16", "correction.mode=bypass")
    assert trainer.old_logprobs_plan.source == "rollout"


def test_top_k_top_p_sampling_is_on_policy_at_the_first_minibatch(tiny_overrides):
    # The behaviour policy is the truncated distribution: the trainer's log-probabilities over the same
    # support make the first minibatch's ratio exactly 1 (up to float rounding), for every token.
    trainer = _trainer(tiny_overrides, "algorithm=grpo", "rollout.top_k=5", "rollout.top_p=0.8",
                       "loss.old_logprobs=recompute", "rollout.temperature=1.3")
    trainer.train_step()
    first = trainer.last_updates[0]
    assert abs(first["ratio/max"] - 1) < 1e-5 and abs(first["ratio/min"] - 1) < 1e-5
    assert first["logratio/token_std"] < 1e-6
