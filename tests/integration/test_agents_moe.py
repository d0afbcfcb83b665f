"""Agents on a tiny MoE with Routing Replay (R2, R3): the replayed routes cover every turn's model tokens."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gspo.agents.env import Environment, Reply
from gspo.config import load_config
from gspo.moe import capture_routing
from gspo.tasks.arithmetic import ArithmeticTask
from gspo.tasks.base import Task
from gspo.trainer import update
from gspo.trainer.trainer import Trainer


class AlwaysAnswer(Environment):
    """Says "try again" after every turn: every episode has exactly max_turns model turns."""

    max_turns = 2

    def step(self, state, text):
        return Reply(message="try again")


def digits(prompt, completion, **row):
    """A reward with a signal even for a random model: the share of digits in the answer."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def calc_moe_dir(tmp_path_factory):
    from gspo.agents.calculator import build_calc_tokenizer
    from gspo.models.tiny_moe import build_tiny_qwen3_moe

    path = tmp_path_factory.mktemp("tiny-calc-moe")
    tokenizer = build_calc_tokenizer()
    model = build_tiny_qwen3_moe(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                 moe_intermediate_size=16, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_routing_replay_covers_the_experts_of_every_turn(calc_moe_dir, monkeypatch, replay):
    """R2: the trainer's old-policy pass over the whole episode. R3: the engine's experts of each turn,
    stitched into the episode's layout; on-policy they are the experts the trainer's forward chooses."""
    arith = ArithmeticTask(seed=0)
    task = Task("two-turns", arith.iter_train, arith.eval_rows(4), {"digits": (digits, 1.0)},
                environment=AlwaysAnswer())
    config = load_config(None, [f"model={calc_moe_dir}", f"moe.routing_replay={replay}", "algorithm=grpo", "steps=1",
                                "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
                                "optim.minibatches=2", "optim.lr=3e-2", "eval.size=4", "log.progress=false",
                                "log.tensorboard=false", "checkpoint.every=0"])
    trainer = Trainer.from_config(config, None, task=task)
    real_replay, seen = update.replay_routing, []

    @contextlib.contextmanager
    def observed(model, record):
        with real_replay(model, record) as stats, capture_routing(model) as live:
            yield stats
        seen.append((record, live))

    monkeypatch.setattr(update, "replay_routing", observed)
    metrics = trainer.train_step()
    assert metrics["agent/turns_mean"] == 2.0
    assert len(seen) == 2
    for record, live in seen:
        for used, recorded in zip(live.indices, record.indices):
            assert torch.equal(used, recorded)  # every position: prompt, both model turns, the env message
    changed = [m["moe/replay_changed_frac"] for m in trainer.last_updates]
    assert changed[0] == 0.0 and max(changed[1:]) > 0  # the first minibatch is on-policy: nothing to override
