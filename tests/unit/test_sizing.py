"""What a run decides before its weights load (gspo.trainer.sizing): the sampler's weights are decided once.

Whether FSDP2's built-in sampler can sample through the shards is evaluated once per build, fed to the
memory plan, and the build reads the plan's choice back (it used to evaluate the refusal a second time).
"""

from __future__ import annotations

import pytest


def test_the_sampler_shards_refusal_is_evaluated_once_per_build(tiny_overrides, monkeypatch):
    from gspo import memory_plan
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    calls = []
    refusal = memory_plan.sampler_shards_refusal
    monkeypatch.setattr(memory_plan, "sampler_shards_refusal", lambda *a, **k: calls.append(1) or refusal(*a, **k))
    trainer = Trainer.from_config(load_config(None, tiny_overrides), run_dir=None)
    try:
        assert trainer.parts.memory is not None  # the tiny model's config has the shape keys: the plan decided
        assert trainer.parts.memory.sampler_weights == "copy"
        assert len(calls) == 1
    finally:
        trainer.close()


@pytest.mark.parametrize("weights", ["auto", "copy"])
def test_an_engine_passed_in_never_samples_through_the_shards(weights):
    from gspo.config import load_config
    from gspo.precision import PrecisionPolicy
    from gspo.trainer.sizing import sampler_can_shard, samples_through_shards

    config = load_config(None, [f"rollout.sampler_weights={weights}", "distributed.strategy=fsdp"])
    assert not sampler_can_shard(config, PrecisionPolicy(), agents=False, own_engine=True)
    assert not samples_through_shards(config, PrecisionPolicy(), None, agents=False, own_engine=True)
