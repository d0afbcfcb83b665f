"""gspo's native decode step reproduces transformers' forward, and refuses what it cannot reproduce."""

from __future__ import annotations

import pytest
import torch
import transformers

from gspo.logprobs import position_ids_from_mask
from gspo.rollout.hf import HFEngine
import gspo.rollout.native as native
from gspo.rollout.native import NativeDecoder, native_support

VOCAB = 40
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64)


def build(kind: str, *, heads: int = 4, kv_heads: int = 2, seed: int = 0, **extra) -> torch.nn.Module:
    configs = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config,
               "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}
    config = configs[kind](num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, **SHAPE, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a dropped term shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def ragged_batch(batch: int = 5, prompt_len: int = 7, new: int = 6):
    """(B, P + N) ids with row r left-padded by r tokens, its mask and the HF position ids."""
    ids = torch.randint(3, VOCAB, (batch, prompt_len + new), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    for row in range(batch):
        mask[row, :row] = False
    ids = ids.masked_fill(~mask, 0)
    return ids, mask, position_ids_from_mask(mask)


def native_logits(model, ids, mask, positions, prompt_len: int) -> torch.Tensor:
    """(B, N, V) next-token logits from a native prefill and teacher-forced decode steps."""
    decoder = NativeDecoder(model)
    total = ids.shape[1]
    with torch.inference_mode():
        out = [decoder.start(ids[:, :prompt_len], mask[:, :prompt_len], positions[:, :prompt_len], total)]
        for t in range(prompt_len, total - 1):
            out.append(decoder.step(ids[:, t : t + 1], positions[:, t : t + 1]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("kind,heads,kv_heads,extra", [
    ("qwen3", 4, 2, {}),  # grouped queries, per-head q/k norms
    ("qwen3", 4, 4, {}),  # plain multi-head
    ("qwen3", 4, 1, {"attention_bias": True}),  # multi-query, biased projections
    ("qwen2", 4, 2, {}),  # Q/K/V biases
    ("llama", 4, 2, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", 4, 2, {"mlp_bias": True, "attention_bias": True}),  # biases on every projection
    ("mistral", 4, 2, {"sliding_window": None}),
])
def test_native_logits_equal_transformers_forward(kind, heads, kv_heads, extra):
    model = build(kind, heads=heads, kv_heads=kv_heads, **extra)
    assert native_support(model) is None
    ids, mask, positions = ragged_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits  # (B, L, V)
    got = native_logits(model, ids, mask, positions, prompt_len=7)
    torch.testing.assert_close(got, reference[:, 6:-1], atol=2e-5, rtol=1e-5)


def test_native_sees_weight_updates_between_rollouts():
    """The fused projections are rebuilt from the live modules at every rollout."""
    model = build("qwen3")
    ids, mask, positions = ragged_batch()
    before = native_logits(model, ids, mask, positions, prompt_len=7)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        model.model.layers[1].mlp.up_proj.weight.mul_(0.5)
        reference = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
    after = native_logits(model, ids, mask, positions, prompt_len=7)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference[:, 6:-1], atol=2e-5, rtol=1e-5)


def test_native_bfloat16_copy_matches_transformers_in_bfloat16():
    model = build("qwen3").to(torch.bfloat16)
    ids, mask, positions = ragged_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits.float()
    got = native_logits(model, ids, mask, positions, prompt_len=7)
    # bfloat16 has 8 bits of mantissa: compare log-probabilities at that precision.
    torch.testing.assert_close(got.log_softmax(-1), reference[:, 6:-1].log_softmax(-1), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("make,reason", [
    (lambda: build("mistral", sliding_window=4), "sliding-window"),
    (lambda: build("qwen3", use_sliding_window=True, sliding_window=4), "sliding-window"),
    (lambda: build("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "RoPE type 'dynamic'"),
    (lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32)), "model_type 'qwen3_moe'"),
    (lambda: build("llama", hidden_act="gelu"), "SiLU"),
])
def test_unsupported_models_are_refused_with_a_reason(make, reason):
    model = make()
    assert reason in native_support(model)
    engine = HFEngine(model, pad_token_id=0, eos_token_id=1)  # auto: falls back to transformers' forward
    assert engine.native is None and reason in engine.native_reason
    with pytest.raises(ValueError, match="rollout.decoder=native cannot sample this model"):
        HFEngine(model, pad_token_id=0, eos_token_id=1, decoder="native")


def test_peft_wrapped_models_use_transformers_forward():
    peft = pytest.importorskip("peft", reason="the LoRA extra (peft) is not installed")
    model = peft.get_peft_model(build("qwen3"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "PEFT" in native_support(model)
    assert HFEngine(model, pad_token_id=0, eos_token_id=1).native is None


def test_unknown_decoder_name_is_an_error():
    with pytest.raises(ValueError, match="decoder must be one of auto, native, hf"):
        HFEngine(build("qwen3"), pad_token_id=0, eos_token_id=1, decoder="vllm")


def test_large_models_keep_separate_projections(monkeypatch):
    """Above FUSE_MAX_PARAMS no fused copy of the weights is made; the logits are the same."""
    import gspo.rollout.native as native

    model = build("qwen2")  # with Q/K/V biases
    ids, mask, positions = ragged_batch()
    fused = native_logits(model, ids, mask, positions, prompt_len=7)
    monkeypatch.setattr(native, "FUSE_MAX_PARAMS", 0)
    monkeypatch.setattr(native, "prepacked_linear_supported", lambda device, dtype: False)
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        decoder.start(ids[:, :7], mask[:, :7], positions[:, :7], ids.shape[1])
    assert all(layer.qkv is None and layer.gate_up is None for layer in decoder.layers)
    separate = native_logits(model, ids, mask, positions, prompt_len=7)
    torch.testing.assert_close(separate, fused, atol=2e-5, rtol=1e-5)


def test_engine_holds_no_cache_between_rollouts():
    from gspo.rollout.base import SamplingParams

    engine = HFEngine(build("qwen3"), pad_token_id=0, eos_token_id=1)
    engine.generate([[5, 6, 7], [8]], SamplingParams(max_new_tokens=4))
    assert engine.native.layers == [] and engine.native._cos is None


def test_cache_grows_in_blocks_and_gives_the_same_logits(monkeypatch):
    """The cache holds the prompt plus one block, grows by blocks as decoding needs, never past P + N."""
    import gspo.rollout.native as native

    model = build("qwen3")
    ids, mask, positions = ragged_batch(prompt_len=7, new=12)
    whole = native_logits(model, ids, mask, positions, prompt_len=7)  # one block covers the whole rollout
    monkeypatch.setattr(native, "CACHE_BLOCK", 5)
    decoder = NativeDecoder(model)
    capacities, out = [], []
    with torch.inference_mode():
        out.append(decoder.start(ids[:, :7], mask[:, :7], positions[:, :7], ids.shape[1]))
        capacities.append(decoder.layers[0].k_cache.shape[2])
        for t in range(7, ids.shape[1] - 1):
            out.append(decoder.step(ids[:, t : t + 1], positions[:, t : t + 1]))
            capacities.append(decoder.layers[0].v_cache.shape[2])
    assert capacities[0] == 12 and max(capacities) == ids.shape[1] == 19  # 7 + 5, then 17, then capped at 19
    assert sorted(set(capacities)) == [12, 17, 19]
    torch.testing.assert_close(torch.stack(out, dim=1), whole, atol=1e-6, rtol=1e-6)


def test_select_keeps_rows_of_the_cache():
    """Dropping rows between steps leaves the kept rows' logits as they were."""
    got, want = kept_rows_logits(build("qwen3"), torch.tensor([4, 1, 3]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def kept_rows_logits(model, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` rows' decode logits after a select right after the prefill, and the same rows' logits
    decoded within the whole batch."""
    ids, mask, positions = ragged_batch(prompt_len=7, new=6)
    whole = native_logits(model, ids, mask, positions, prompt_len=7)  # (B, N, V)
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        decoder.start(ids[:, :7], mask[:, :7], positions[:, :7], ids.shape[1])
        decoder.select(keep)
        got = [decoder.step(ids[keep, t : t + 1], positions[keep, t : t + 1]) for t in range(7, ids.shape[1] - 1)]
    return torch.stack(got, dim=1), whole[keep, 1:]


needs_packing = pytest.mark.skipif(not native.prepacked_linear_supported(torch.device("cpu"), torch.bfloat16),
                                   reason="this CPU's oneDNN has no native bfloat16 (prepacked weights unused)")


@needs_packing
def test_prepacked_bfloat16_weights_give_the_unpacked_logits(monkeypatch):
    """Decode GEMMs through oneDNN's prepacked weights equal F.linear's bit for bit (biases on every projection)."""
    model = build("llama", mlp_bias=True, attention_bias=True).to(torch.bfloat16)
    ids, mask, positions = ragged_batch()
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        decoder.start(ids[:, :7], mask[:, :7], positions[:, :7], ids.shape[1])
    assert decoder.head is not None and all(layer.down.packed is not None for layer in decoder.layers)
    packed = native_logits(model, ids, mask, positions, prompt_len=7)
    monkeypatch.setattr(native, "prepacked_linear_supported", lambda device, dtype: False)
    plain = native_logits(model, ids, mask, positions, prompt_len=7)
    monkeypatch.undo()
    # bit for bit on the CPUs measured (the same oneDNN kernel); bfloat16 rounding of the outputs is the bound
    torch.testing.assert_close(packed, plain, atol=1e-2, rtol=1e-2)
    of = native._Proj.of.__func__
    monkeypatch.setattr(native._Proj, "of", classmethod(lambda cls, ws, bs, dtype, pack: of(cls, ws, [None] * len(bs),
                                                                                             dtype, pack)))
    assert (native_logits(model, ids, mask, positions, prompt_len=7) - plain).abs().max() > 0.1  # biases count


@needs_packing
def test_prepacked_rows_leaving_the_batch_keep_their_logits():
    """With prepacked bfloat16 weights, the kept rows' logits after a select are the whole batch's."""
    got, want = kept_rows_logits(build("qwen3").to(torch.bfloat16), torch.tensor([4, 1]))
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
