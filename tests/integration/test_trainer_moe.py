"""The trainer on a tiny MoE: volatility diagnostics and Routing Replay (R2, R3) wired end to end."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gspo.config import load_config
from gspo.errors import ConfigError
from gspo.moe import capture_routing
from gspo.trainer import update
from gspo.trainer.trainer import Trainer


@pytest.fixture
def moe_overrides(tiny_overrides, tiny_moe_dir):
    return [o for o in tiny_overrides if not o.startswith("model=")] + [f"model={tiny_moe_dir}", "optim.lr=3e-2",
                                                                         "algorithm=grpo", "optim.minibatches=4"]


def test_volatility_is_zero_on_policy_and_positive_after_updates(moe_overrides):
    trainer = Trainer.from_config(load_config(None, moe_overrides), None)
    trainer.train_step()
    first, *later = trainer.last_updates
    assert first["moe/volatility"] == 0.0  # same weights, same tokens: the same experts
    assert max(m["moe/volatility"] for m in later) > 0  # a large learning rate moves the routers


@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_routing_replay_trains_and_forces_behaviour_experts(moe_overrides, replay, monkeypatch):
    trainer = Trainer.from_config(load_config(None, [*moe_overrides, f"moe.routing_replay={replay}"]), None)
    router_before = [p.detach().clone() for n, p in trainer.model.named_parameters() if ".gate." in n]
    real_replay, seen = update.replay_routing, []

    @contextlib.contextmanager
    def observed_replay(model, record):  # the experts the training forward really used, after replay
        with real_replay(model, record) as stats, capture_routing(model) as live:
            yield stats
        seen.append((record, live))

    monkeypatch.setattr(update, "replay_routing", observed_replay)
    trainer.train_step()
    assert len(seen) == 4  # one replayed forward per minibatch
    for record, live in seen:
        assert live.num_layers == record.num_layers > 0
        for used, recorded in zip(live.indices, record.indices):
            assert torch.equal(used, recorded)  # exactly the behaviour policy's experts, every position and layer
    # (without replay the same settings change experts in later minibatches: the volatility test above)
    assert all("moe/volatility" not in m for m in trainer.last_updates)  # replayed: nothing to measure
    # ... but replay is observable: the first minibatch needs no override (same weights), later ones do
    changed = [m["moe/replay_changed_frac"] for m in trainer.last_updates]
    assert changed[0] == 0.0 and max(changed[1:]) > 0
    router_after = [p for n, p in trainer.model.named_parameters() if ".gate." in n]
    assert router_before and all(not torch.equal(a, b) for a, b in zip(router_before, router_after))


def test_replay_on_a_dense_model_is_a_config_error(tiny_overrides):
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        Trainer.from_config(load_config(None, [*tiny_overrides, "moe.routing_replay=r2"]), None)
