"""Router capture and Routing Replay (GSPO section 5.3) on tiny Hugging Face MoE models, on the CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gspo.models.tiny_moe import build_tiny_qwen3_moe
from gspo.moe import (
    RoutingRecord,
    capture_routing,
    expert_volatility,
    replay_routing,
    supports_routing,
)

VOCAB = 32
NUM_EXPERTS = 8
TOP_K = 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_hidden_layers=2,
    max_position_embeddings=64,
    num_experts_per_tok=TOP_K,
)


def _qwen3_moe():
    return build_tiny_qwen3_moe(VOCAB, hidden_size=32, num_layers=2, num_experts=NUM_EXPERTS, top_k=TOP_K)


def _mixtral():
    return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=NUM_EXPERTS))


def _qwen2_moe():
    # Three layers, the middle one dense: the record must hold only the two MoE layers.
    config = Qwen2MoeConfig(
        **{**COMMON, "num_hidden_layers": 3},
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=NUM_EXPERTS,
        norm_topk_prob=False,  # Qwen2-MoE's default: replay must then NOT renormalise
        mlp_only_layers=[1],
    )
    return Qwen2MoeForCausalLM(config)


def _olmoe():
    ids = dict(pad_token_id=0, eos_token_id=1)  # OLMoE's defaults lie outside the tiny vocabulary
    config = OlmoeConfig(**COMMON, **ids, intermediate_size=32, num_experts=NUM_EXPERTS)
    return OlmoeForCausalLM(config)


BUILDERS = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe}
NUM_MOE_LAYERS = {"qwen3_moe": 2, "mixtral": 2, "qwen2_moe": 2, "olmoe": 2}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    torch.manual_seed(0)
    return BUILDERS[arch]().eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))  # (B, S)


def _routers(model):
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]


def _perturb_routers(model, scale=5.0):
    """A large update to every router weight, so that the live top-k changes for many tokens."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for router in _routers(model):
            router.weight.add_(scale * torch.randn(router.weight.shape, generator=generator))


def _capture(model, input_ids, **kwargs):
    with torch.no_grad(), capture_routing(model) as record:
        logits = model(input_ids, **kwargs).logits
    return record, logits


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_matches_the_routers_own_top_k(arch, model, input_ids):
    record, _ = _capture(model, input_ids)
    assert record.num_layers == NUM_MOE_LAYERS[arch]
    assert record.shape == (3, 7) and record.top_k == TOP_K
    with torch.no_grad():
        router_logits = model(input_ids, output_router_logits=True).router_logits  # per layer (B*S, E)
    moe_logits = [x for x in router_logits if x is not None]
    for captured, logits in zip(record.indices, moe_logits, strict=True):
        expected = logits.topk(TOP_K, dim=-1).indices.reshape(3, 7, TOP_K)
        assert torch.equal(captured.long().sort(-1).values, expected.sort(-1).values)
    # compact: one byte per expert id (8 experts), not int64's eight (R3 records at long lengths)
    assert all(layer.dtype == torch.uint8 for layer in record.indices)
    assert record.pad_to(9).indices[0].dtype == torch.uint8


def test_replay_on_unchanged_model_changes_no_logit(model, input_ids):
    record, plain = _capture(model, input_ids)
    with torch.no_grad(), replay_routing(model, record):
        replayed = model(input_ids).logits
    torch.testing.assert_close(replayed, plain, atol=1e-6, rtol=0)


def test_replay_uses_cached_experts_after_a_large_router_update(model, input_ids):
    old, _ = _capture(model, input_ids)
    _perturb_routers(model)
    new, _ = _capture(model, input_ids)
    assert expert_volatility(old, new)[0] > 0.1  # a plain forward now routes differently
    with torch.no_grad(), replay_routing(model, old), capture_routing(model) as used:
        model(input_ids)
    assert all(torch.equal(u, o) for u, o in zip(used.indices, old.indices, strict=True))


def test_capture_outside_replay_also_sees_replayed_experts(model, input_ids):
    old, _ = _capture(model, input_ids)
    _perturb_routers(model)
    with torch.no_grad(), capture_routing(model) as used, replay_routing(model, old):
        model(input_ids)
    assert all(torch.equal(u, o) for u, o in zip(used.indices, old.indices, strict=True))


def test_volatility_is_zero_for_same_model_and_inputs(model, input_ids):
    first, _ = _capture(model, input_ids)
    second, _ = _capture(model, input_ids)
    mean, per_layer = expert_volatility(first, second)
    assert mean.item() == 0.0 and per_layer.shape == (first.num_layers,)


def test_router_receives_gradient_under_replay(model, input_ids):
    old, _ = _capture(model, input_ids)
    _perturb_routers(model, scale=0.5)
    model.train()
    with replay_routing(model, old):
        logits = model(input_ids).logits
    logits.logsumexp(-1).sum().backward()
    for router in _routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_replayed_gate_weights_come_from_live_logits(model, input_ids):
    """Replay on a perturbed model != replay on the original: the weights follow the live router."""
    old, before = _capture(model, input_ids)
    _perturb_routers(model, scale=0.5)
    with torch.no_grad(), replay_routing(model, old):
        after = model(input_ids).logits
    assert not torch.allclose(after, before, atol=1e-4)


def test_hooks_work_when_decoder_body_is_called_directly(model, input_ids):
    record, plain = _capture(model, input_ids)
    with torch.no_grad(), capture_routing(model) as via_body:
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state  # (B, S, H)
    assert all(torch.equal(a, b) for a, b in zip(via_body.indices, record.indices, strict=True))
    _perturb_routers(model)
    with torch.no_grad(), replay_routing(model, record), capture_routing(model) as used:
        model.get_decoder()(input_ids=input_ids)
    assert all(torch.equal(a, b) for a, b in zip(used.indices, record.indices, strict=True))
    assert hidden.shape[:2] == plain.shape[:2]


def test_replay_with_gradient_checkpointing_matches_plain_replay(input_ids):
    torch.manual_seed(0)
    model = _qwen3_moe()
    old, _ = _capture(model, input_ids)
    _perturb_routers(model)
    model.train()

    def router_grads():
        model.zero_grad()
        with replay_routing(model, old):  # backward inside: the recomputed forward replays too
            model(input_ids).logits.logsumexp(-1).sum().backward()
        return [r.weight.grad.clone() for r in _routers(model)]

    expected = router_grads()
    from gspo.trainer.build import _enable_checkpointing

    _enable_checkpointing(model)  # either transformers name of the switch (it changed in 5.2x)
    for got, want in zip(router_grads(), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_unsupported_architecture_raises_a_clear_error():
    dense = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}))
    assert not supports_routing(dense)
    with pytest.raises(ValueError, match=r"'qwen3'.*Supported architectures: qwen3_moe.*mixtral"):
        with capture_routing(dense):
            pass
    with pytest.raises(ValueError, match="no supported MoE router"):
        with replay_routing(dense, RoutingRecord()):
            pass


def test_supports_routing_on_moe_models(model):
    assert supports_routing(model)


def test_hooks_are_removed_on_exit_even_after_an_exception(model, input_ids):
    old, _ = _capture(model, input_ids)  # also installs transformers' own lazy hooks
    _perturb_routers(model)
    baseline_hooks = _hook_count(model)
    _, plain = _capture(model, input_ids)
    with pytest.raises(RuntimeError, match="boom"):
        with replay_routing(model, old), capture_routing(model):
            assert _hook_count(model) > baseline_hooks
            raise RuntimeError("boom")
    assert _hook_count(model) == baseline_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, plain)


def test_replay_rejects_a_batch_of_another_shape(model, input_ids):
    record, _ = _capture(model, input_ids)
    baseline_hooks = _hook_count(model)
    with pytest.raises(ValueError, match=r"\(batch, seq\) = \(3, 6\).*captured on \(3, 7\)"):
        with torch.no_grad(), replay_routing(model, record):
            model(input_ids[:, :6])
    assert _hook_count(model) == baseline_hooks


def test_replay_rejects_a_record_of_another_depth(model, input_ids):
    record, _ = _capture(model, input_ids)
    with pytest.raises(ValueError, match="MoE layers"):
        with replay_routing(model, RoutingRecord(record.indices[:1])):
            pass


def test_selected_rows_replay_on_a_micro_batch(model, input_ids):
    record, plain = _capture(model, input_ids)
    rows = torch.tensor([2, 0])
    sub = record.select(rows)
    assert sub.shape == (2, 7)
    assert all(torch.equal(s, full[rows]) for s, full in zip(sub.indices, record.indices, strict=True))
    with torch.no_grad(), replay_routing(model, sub):
        torch.testing.assert_close(model(input_ids[rows]).logits, plain[rows], atol=1e-5, rtol=0)


def test_micro_batch_captures_concatenate_along_the_batch(model, input_ids):
    full, _ = _capture(model, input_ids)
    with torch.no_grad(), capture_routing(model) as chunks:
        model(input_ids[:2])
        model(input_ids[2:])
    assert chunks.shape == (3, 7)
    assert expert_volatility(chunks, full)[0].item() == 0.0
    with pytest.raises(ValueError, match="cannot be concatenated"):
        with torch.no_grad(), capture_routing(model):
            model(input_ids)
            model(input_ids[:, :5])


def test_generation_capture_covers_the_full_sequence_for_r3(model):
    """R3 with an in-process engine: capture KV-cached decoding, pad, replay on the full forward."""
    pad = 0
    prompts = torch.tensor([[pad, pad, 5, 6], [7, 8, 9, 10]])  # (B, P) left-padded
    prompt_mask = prompts != pad
    with torch.no_grad(), capture_routing(model, concat="sequence") as sampled:
        sequences = model.generate(
            prompts, attention_mask=prompt_mask.long(), max_new_tokens=4, do_sample=False, pad_token_id=pad
        )  # (B, P + T)
    assert sampled.shape == (2, sequences.shape[1] - 1)  # the last sampled token is never forwarded
    sampled = sampled.pad_to(sequences.shape[1])
    attention_mask = torch.cat([prompt_mask, torch.ones(2, 4, dtype=torch.bool)], dim=1)
    full, _ = _capture(model, sequences, attention_mask=attention_mask.long())
    real = attention_mask.clone()
    real[:, -1] = False  # the filler position
    assert expert_volatility(sampled, full, mask=real)[0].item() == 0.0


def test_r2_through_token_logprobs(input_ids):
    """The trainer's path: capture in the old-logprob pass, replay in the training forward, both through
    ``gspo.logprobs.token_logprobs`` (decoder body + chunked LM head)."""
    from gspo.logprobs import token_logprobs

    torch.manual_seed(0)
    model = _qwen3_moe()
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask[0, :2] = False  # a left-padded prompt
    with torch.no_grad(), capture_routing(model) as routing:
        old_logprobs = token_logprobs(model, input_ids, attention_mask, 4, chunk_size=3)  # (B, T)
    with replay_routing(model, routing):
        logprobs = token_logprobs(model, input_ids, attention_mask, 4, chunk_size=3)
    torch.testing.assert_close(logprobs.detach(), old_logprobs, atol=1e-6, rtol=0)
    logprobs.sum().backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in _routers(model))
