"""Every no-grad pass runs the update's micro-batches: the MoE passes (routing recorded or replayed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from batch_helpers import padded_batch

from gspo.config.schema import Config
from gspo.models.tiny import build_char_tokenizer
from gspo.models.tiny_moe import build_tiny_qwen3_moe
from gspo.moe import RoutingRecord, capture_routing, replay_routing
from gspo.trainer.old_logprobs import OldLogprobPlan, OldLogprobs
from gspo.trainer.policy import PolicyLogprobs
from gspo.trainer.update import Updater

P, T, ROWS = 5, 8, 12


def _batch(seed: int = 0, vocab: int = 18):
    """Prompts of 2..5 tokens, responses of 1..8 tokens (batch_helpers.padded_batch)."""
    return padded_batch(ROWS, P, T, seed=seed, vocab=vocab)


def _moe():
    model = build_tiny_qwen3_moe(build_char_tokenizer(), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                 moe_intermediate_size=16, seed=0)
    model.config.use_cache = False
    return model


def _updater(**kw) -> Updater:
    return Updater("gspo", Config(algorithm="gspo").hyperparameters, minibatches=2, max_grad_norm=0.0, **kw)


def _passes(model, plan, updater, calls):
    policy = PolicyLogprobs(model)

    def fn(ids, attn, num_t, routed=False):
        calls.append(ids.shape[0])
        return policy(ids, attn, num_t, routed=routed)

    return OldLogprobs(plan, policy=fn, routed_model=model, micro_batches=updater.micro_batches)


def _rollout(ids, attention, mask, routing=None):
    return SimpleNamespace(input_ids=ids, attention_mask=attention, completion_ids=ids[:, P:], completion_mask=mask,
                           logprobs=torch.zeros(mask.shape), routing=routing)


@pytest.mark.parametrize("source", ["recompute", "rollout"])
def test_routing_capture_pass_runs_the_update_s_micro_batches_with_the_one_forward_result(source):
    # R2 / volatility diagnostics record the old policy's experts: per micro-batch of the update, not one
    # forward of the whole batch, with the same log-probabilities and the same (B, P + T, k) record
    model = _moe()
    ids, attention, mask = _batch()
    updater = _updater(micro_batch_size=2)
    plan = OldLogprobPlan(source=source, setting=source, reason="test", capture_routing=True)
    calls = []
    passes = _passes(model, plan, updater, calls)
    minibatches = updater.plan(torch.Generator().manual_seed(0), ROWS)[0]
    inputs, metrics = passes(SimpleNamespace(rollout=_rollout(ids, attention, mask), advantages=torch.zeros(ROWS)),
                             minibatches=minibatches)
    assert calls == [2] * 6  # 2 minibatches of 6 rows, micro-batches of 2
    policy = PolicyLogprobs(model)
    with torch.no_grad(), capture_routing(model) as whole:
        one = policy(ids, attention, T, routed=True)  # (B, T) one forward of the whole batch
    if source == "recompute":
        torch.testing.assert_close(inputs.old_logprobs, one, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(inputs.old_logprobs, torch.zeros(mask.shape))  # the sampler's, as before
    assert inputs.routing.shape == (ROWS, P + T)
    for got, ref in zip(inputs.routing.indices, whole.indices, strict=True):
        assert torch.equal(got, ref)


def test_r3_replay_pass_runs_the_update_s_micro_batches_on_the_engine_s_experts():
    model = _moe()
    ids, attention, mask = _batch(seed=1)
    engine_model = _moe_with_other_routers()  # an engine whose routes differ from the trainer's
    with torch.no_grad(), capture_routing(engine_model) as engine:
        PolicyLogprobs(engine_model)(ids, attention, T, routed=True)
    updater = _updater(micro_batch_size=3)
    plan = OldLogprobPlan(source="recompute", setting="recompute", reason="test", routing_from_rollout=True)
    calls = []
    passes = _passes(model, plan, updater, calls)
    minibatches = updater.plan(torch.Generator().manual_seed(0), ROWS)[0]
    inputs, _ = passes(SimpleNamespace(rollout=_rollout(ids, attention, mask, engine), advantages=torch.zeros(ROWS)),
                       minibatches=minibatches)
    assert calls == [3] * 4
    with torch.no_grad(), replay_routing(model, engine) as stats:
        one = PolicyLogprobs(model)(ids, attention, T, routed=True)  # (B, T)
    assert any(bool(changed.any()) for changed in stats.changed)  # the replay matters here
    torch.testing.assert_close(inputs.old_logprobs, one, rtol=1e-5, atol=1e-6)
    assert inputs.routing is engine


def _moe_with_other_routers() -> torch.nn.Module:
    model = _moe()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model


def test_routing_capture_in_bfloat16_makes_the_onpolicy_ratio_exactly_one():
    # R2 under bfloat16: pi_old and its experts come from the update's own micro-batches (same rows, same
    # kernels), so the first minibatch's forward, replaying those experts, reproduces pi_old bit for bit
    model = _moe()
    ids, attention, mask = _batch(seed=2)
    updater = _updater(micro_batch_size=3, autocast_dtype=torch.bfloat16, routing_replay=True)
    plan = OldLogprobPlan(source="recompute", setting="recompute", reason="test", capture_routing=True)
    passes = _passes(model, plan, updater, [])
    minibatches = updater.plan(torch.Generator().manual_seed(0), ROWS)
    with updater.autocast("cpu"):
        inputs, _ = passes(SimpleNamespace(rollout=_rollout(ids, attention, mask), advantages=torch.randn(ROWS)),
                           minibatches=minibatches[0])
    seen = []
    updater.on_logprobs = lambda lp, old, m: seen.append((lp.float() * m, old * m))
    policy = PolicyLogprobs(model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    updater.update(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), inputs,
                   plan=minibatches)
    assert len(seen) == 4
    for logprobs, old in seen:
        assert torch.equal(logprobs, old)
