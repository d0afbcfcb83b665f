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


def _perturb_engine_routers(trainer, scale: float = 0.3) -> None:
    """Give the engine's own copy routers of its own: its experts differ from the trainer's at some tokens
    (the R3 setting: an inference engine whose routes are not the trainer's)."""
    engine_model = trainer.parts.engine.model
    assert engine_model is not trainer.model  # rollout.engine_dtype=bfloat16 keeps a copy
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in engine_model.named_parameters():
            if name.endswith(".gate.weight"):
                p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


def test_r3_recomputes_pi_old_with_the_engines_experts_so_the_onpolicy_ratio_is_one(moe_overrides):
    # R3 replays the engine's experts in every training forward; pi_old must be evaluated on the same
    # experts, or the first (on-policy) minibatch's ratio is not 1 where the routes differ (review D1).
    trainer = Trainer.from_config(load_config(None, [*moe_overrides, "moe.routing_replay=r3", "algorithm=gspo",
                                                     "rollout.engine_dtype=bfloat16"]), None)
    assert trainer.old_logprobs_plan.source == "recompute"
    _perturb_engine_routers(trainer)
    seen = []
    trainer.updater.on_logprobs = lambda logprobs, old, mask: seen.append((logprobs, old, mask))
    trainer.train_step()
    first = trainer.last_updates[0]
    assert first["moe/replay_changed_frac"] > 0.05  # the trainer's routers disagree with the engine's
    logprobs, old, mask = seen[0]  # minibatch 0: theta == theta_old
    assert torch.equal(logprobs[mask].float(), old[mask])  # exactly the same experts on both sides
    assert first["ratio/min"] == first["ratio/max"] == 1.0


@pytest.mark.parametrize("replay", ["off", "r2", "r3"])
def test_gradient_checkpointing_with_routing_record_gives_the_same_update(tiny_overrides, replay):
    # A checkpointed backward runs every router again: the capture must record the forward only (it raised
    # "routings differ in shape"), and replay must hold the recomputed forward to the same experts.
    overrides = [o for o in tiny_overrides if not o.startswith("model=")] + [
        "model=tiny-moe", "algorithm=grpo", "optim.minibatches=2", "rollout.prompts_per_step=2",
        f"moe.routing_replay={replay}"]
    plain = Trainer.from_config(load_config(None, overrides), None)
    checkpointed = Trainer.from_config(load_config(None, [*overrides, "optim.gradient_checkpointing=true"]), None)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.model.layers)
    a, b = plain.train_step(), checkpointed.train_step()
    key = "moe/volatility" if replay == "off" else "moe/replay_changed_frac"
    assert a[key] == pytest.approx(b[key], abs=1e-6)
    for p, q in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # float rounding of the recomputation
