"""HFEngine on a tiny random Qwen3: log-probabilities, padding, EOS, determinism, bf16 weight sync.

Behavioural tests run with both decode paths: gspo's native decode step and transformers' forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from gspo.logprobs import token_logprobs
from gspo.rollout.base import RolloutEngine, SamplingParams
from gspo.rollout.hf import HFEngine, _filtered_logits
from gspo.rollout.native import prepacked_linear_supported

VOCAB, PAD, EOS = 32, 0, 1
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19]]  # ragged: left padding


def tiny_qwen3(seed: int = 0) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(config)


def engine_for(model, **kwargs) -> HFEngine:
    return HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, **kwargs)


def with_head_bias(model, token: int, value: float):
    """Replace the LM head by one with a bias of ``value`` on ``token`` (same weights)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token] = value
    model.lm_head = head
    return model


def count_forwards(model) -> list[int]:
    """Forward passes through the model, native or not (both embed the input tokens once per pass)."""
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


DECODERS = pytest.mark.parametrize("decoder", ["native", "hf"])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=12, temperature=0.7, top_k=8, top_p=0.9),
        SamplingParams(max_new_tokens=12, temperature=1.3),
    ],
)
@pytest.mark.parametrize("decoder,static_cache", [("native", None), ("hf", True), ("hf", False)])
def test_sampler_logprobs_equal_recomputation(params, decoder, static_cache):
    model = with_head_bias(tiny_qwen3(), EOS, 0.5)  # a likelier EOS: ragged completion lengths
    engine = engine_for(model, decoder=decoder)
    assert (engine.native is not None) == (decoder == "native")
    if static_cache is not None:
        engine.static_cache = static_cache
    rollout = engine.generate(PROMPTS * 2, params, torch.Generator().manual_seed(1))  # a seed with ragged lengths
    assert rollout.lengths.min() < rollout.lengths.max() == params.max_new_tokens
    with torch.no_grad():
        recomputed = token_logprobs(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.completion_ids.shape[1],
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
        )
    assert rollout.logprobs.dtype == torch.float32
    torch.testing.assert_close(rollout.logprobs, recomputed, atol=1e-5, rtol=1e-5)
    assert (rollout.logprobs[~rollout.completion_mask] == 0).all()


@DECODERS
def test_logprobs_are_those_of_the_truncated_distribution(decoder):
    """top_k = 1 draws the argmax with probability 1: the behaviour policy's log-probability is log 1 = 0,
    not the full distribution's (which would bias every ratio by the kept mass)."""
    model = tiny_qwen3()
    engine = engine_for(model, decoder=decoder)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1))
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    assert (greedy.logprobs[greedy.completion_mask] < -1e-3).all()  # the full distribution's
    torch.testing.assert_close(top1.logprobs, torch.zeros_like(top1.logprobs))  # the truncated one's


@DECODERS
def test_left_padding_invariance(decoder):
    model = tiny_qwen3()
    engine = engine_for(model, decoder=decoder)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = engine.generate(PROMPTS, params)
    alone = engine.generate([PROMPTS[2]], params)  # the shortest prompt: most padding when batched
    length = int(alone.lengths[0])
    assert torch.equal(batched.completion_ids[2, :length], alone.completion_ids[0, :length])
    torch.testing.assert_close(batched.logprobs[2, :length], alone.logprobs[0, :length], atol=1e-5, rtol=1e-5)


@DECODERS
@pytest.mark.parametrize("compact", [True, False])
def test_eos_mask_padding_and_truncation(decoder, compact):
    """A scripted EOS: rows stop at different steps, the mask covers EOS, pad follows; with compaction a
    finished row leaves the decode batch before the next step."""
    model = tiny_qwen3()
    eos_after = {0: 2, 2: 0}  # row -> step at which EOS is forced; rows 1 and 3 never emit EOS
    present = list(range(len(PROMPTS)))  # original rows in the decode batch, in order
    batch_sizes = []

    def force_eos(module, args, output):  # logits of the token sampled at step len(batch_sizes)
        n = len(batch_sizes)
        batch_sizes.append(output.shape[0])
        bias = torch.zeros(output.shape[0], VOCAB)
        bias[:, EOS] = -1e4
        for index, row in enumerate(present):
            if eos_after.get(row) == n:
                bias[index, EOS] = 1e4
        if compact:
            present[:] = [row for row in present if eos_after.get(row) != n]
        return output + bias[:, None, :]

    model.lm_head.register_forward_hook(force_eos)
    engine = engine_for(model, decoder=decoder)
    engine.compact = compact
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5), torch.Generator().manual_seed(0))
    assert batch_sizes == ([4, 3, 3, 2, 2] if compact else [4] * 5)
    assert rollout.completion_ids.shape == (4, 5)
    assert rollout.lengths.tolist() == [3, 5, 1, 5]
    assert rollout.completion_ids[0, 2] == EOS and rollout.completion_ids[2, 0] == EOS
    assert (rollout.completion_ids[0, 3:] == PAD).all() and (rollout.completion_ids[2, 1:] == PAD).all()
    assert (rollout.logprobs[0, 3:] == 0).all() and (rollout.logprobs[2, 1:] == 0).all()
    assert rollout.truncated.tolist() == [False, True, False, True]


@DECODERS
def test_stops_as_soon_as_every_sequence_ended(decoder):
    model = with_head_bias(tiny_qwen3(), EOS, 1e4)  # EOS is certain
    calls = count_forwards(model)
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=[3, EOS], decoder=decoder)  # several EOS ids are allowed
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    assert len(calls) == 1  # the prefill only: its logits gave EOS everywhere
    assert rollout.completion_ids.shape == (4, 1) and (rollout.completion_ids == EOS).all()
    assert rollout.completion_mask.all() and not rollout.truncated.any()
    assert set(rollout.timings) == {"sample/prefill_s", "sample/decode_s"}

    calls.clear()
    full = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(calls) == 8  # prefill + 7 decode steps
    assert full.completion_ids.shape == (4, 8) and full.completion_mask.all() and full.truncated.all()
    assert (full.completion_ids == EOS).all()


@DECODERS
def test_greedy_is_deterministic_and_seeds_reproduce(decoder):
    engine = engine_for(tiny_qwen3(), decoder=decoder)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert torch.equal(engine.generate(PROMPTS, greedy).completion_ids, engine.generate(PROMPTS, greedy).completion_ids)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95)
    first = engine.generate(PROMPTS * 4, sampled, torch.Generator().manual_seed(7))
    again = engine.generate(PROMPTS * 4, sampled, torch.Generator().manual_seed(7))
    other = engine.generate(PROMPTS * 4, sampled, torch.Generator().manual_seed(8))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


@DECODERS
def test_training_mode_restored_and_eval_during_sampling(decoder):
    model = tiny_qwen3().train()
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, output: seen.append(module.training))
    engine_for(model, decoder=decoder).generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert seen and not any(seen)
    assert all(module.training for module in model.modules())


def test_shared_engine_and_protocol():
    model = tiny_qwen3()
    engine = engine_for(model, dtype=torch.float32)
    assert isinstance(engine, RolloutEngine)
    assert engine.shares_model and engine.model is model
    engine.sync_weights(model)  # no-op


@DECODERS
def test_bfloat16_copy_and_sync_weights(decoder):
    policy = tiny_qwen3()
    # copy=True: a CPU with prepacked bfloat16 weights keeps no copy otherwise (the test after the next)
    engine = engine_for(policy, dtype=torch.bfloat16, decoder=decoder, copy=True)
    assert engine.model is not policy
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    pointers = [p.data_ptr() for p in engine.model.parameters()]
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = engine.generate(PROMPTS, greedy)
    uniform = -math.log(VOCAB)
    assert (before.logprobs - uniform).abs().max() > 1e-2

    with torch.no_grad():
        policy.model.norm.weight.zero_()  # hidden state 0 -> all logits 0 -> uniform next-token distribution
    after_no_sync = engine.generate(PROMPTS, greedy)
    torch.testing.assert_close(after_no_sync.logprobs, before.logprobs)  # the copy is independent

    engine.sync_weights(policy)
    after = engine.generate(PROMPTS, greedy)
    torch.testing.assert_close(after.logprobs, torch.full_like(after.logprobs, uniform))
    assert [p.data_ptr() for p in engine.model.parameters()] == pointers  # copied in place
    for (name, mine), theirs in zip(engine.model.named_parameters(), policy.parameters()):
        assert torch.equal(mine, theirs.to(torch.bfloat16)), name


def test_filtered_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # (1, V) already sorted
    inf = float("-inf")
    assert torch.isinf(_filtered_logits(logits, 2, 1.0))[0].tolist() == [False, False, True, True]
    nucleus = _filtered_logits(logits, 0, 0.79)  # 0.5 + 0.3 reaches 0.79: keep two
    assert (nucleus[0, 2:] == inf).all() and torch.isfinite(nucleus[0, :2]).all()
    assert torch.isfinite(_filtered_logits(logits, 0, 0.81)[0, :3]).all()
    assert torch.isfinite(_filtered_logits(logits, 0, 0.01)).sum() == 1  # the top token always stays


def _no_multinomial(*args, **kwargs):
    raise AssertionError("torch.multinomial needs a generator on the probabilities' device (a CPU one fails "
                         "on CUDA logits): the engine must sample from per-row seeds")


@DECODERS
def test_a_generator_only_seeds_rows_drawn_on_the_cpu(decoder, monkeypatch):
    """G1: with a generator and no row seeds (evaluation, benchmarks) the engine draws one seed per row
    from the CPU generator and samples each row by inverse CDF on the model's device, the same path as
    with explicit row seeds; torch.multinomial (whose generator must live on the logits' device) is never
    called."""
    from gspo.rollout.base import request_seeds

    monkeypatch.setattr(torch, "multinomial", _no_multinomial)
    engine = engine_for(tiny_qwen3(), decoder=decoder)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    drawn = engine.generate(PROMPTS * 2, params, torch.Generator().manual_seed(3))
    seeds = request_seeds(len(PROMPTS) * 2, None, torch.Generator().manual_seed(3))
    explicit = engine.generate(PROMPTS * 2, params, row_seeds=seeds)
    assert torch.equal(drawn.completion_ids, explicit.completion_ids)
    assert torch.equal(drawn.logprobs, explicit.logprobs)


def test_evaluation_samples_from_row_seeds_whatever_the_chunking(monkeypatch):
    """G1: the held-out evaluation passes per-row seeds (no generator reaches the engine), so its
    samples do not depend on how many prompts share an engine call."""
    from gspo.evaluate import Evaluator
    from gspo.tasks.rewards import WeightedReward

    monkeypatch.setattr(torch, "multinomial", _no_multinomial)
    engine = engine_for(tiny_qwen3())
    calls = []
    original = engine.generate

    def spy(prompts, params, generator=None, **kwargs):
        calls.append((generator, kwargs.get("row_seeds")))
        return original(prompts, params, generator, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    rows = [{"prompt": str(i), "answer": ""} for i in range(5)]
    length = WeightedReward("length", lambda prompt, completion, **kw: len(completion) / 20, 1.0)
    results = []
    for chunk in (2, 5):
        evaluator = Evaluator(engine, render=lambda row: PROMPTS[int(row["prompt"]) % 4], decode=str,
                              rewards=[length], max_new_tokens=6, batch_prompts=chunk)
        results.append(evaluator.evaluate(rows, temperature=1.0, samples=2, seed=4))
    assert all(generator is None and seeds is not None for generator, seeds in calls)
    assert results[0] == results[1]


@pytest.mark.parametrize("decoder,static_cache", [("native", None), ("hf", True), ("hf", False)])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_compaction_gives_the_same_tokens_and_logprobs(decoder, static_cache, temperature):
    """Finished rows leaving the decode batch change nothing: same tokens (bitwise) and log-probabilities
    for the same row seeds, on ragged prompts, groups sharing a prompt and ragged completion lengths."""
    model = with_head_bias(tiny_qwen3(), EOS, 1.5)  # a likely EOS: completions of very different lengths
    engine = engine_for(model, decoder=decoder)
    if static_cache is not None:
        engine.static_cache = static_cache
    prompts = [p for p in PROMPTS for _ in range(3)]  # groups of 3 responses per prompt
    params = SamplingParams(max_new_tokens=16, temperature=temperature)
    seeds = list(range(100, 100 + len(prompts)))
    runs = {}
    for compact in (True, False):
        engine.compact = compact
        runs[compact] = engine.generate(prompts, params, row_seeds=seeds)
    on, off = runs[True], runs[False]
    lengths = on.lengths
    if temperature > 0:
        assert lengths.min() < 4 and lengths.max() == 16  # rows really left the batch at different steps
    assert torch.equal(on.completion_ids, off.completion_ids)
    assert torch.equal(on.completion_mask, off.completion_mask)
    assert torch.equal(on.truncated, off.truncated)
    # batch-size-dependent matrix-product blocking: equal to float rounding, not bitwise
    torch.testing.assert_close(on.logprobs, off.logprobs, atol=1e-6, rtol=1e-6)


@DECODERS
def test_a_shared_prompt_is_prefilled_once(decoder):
    """The G rows of a group share one prefill row; each still samples what it would sample alone."""
    model = tiny_qwen3()
    prefill_rows = []
    model.model.embed_tokens.register_forward_hook(
        lambda module, args, output: prefill_rows.append(output.shape[0]) if output.shape[1] > 1 else None)
    engine = engine_for(model, decoder=decoder)
    prompts = [PROMPTS[1]] * 3 + [PROMPTS[3]] * 2  # two groups
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    seeds = [11, 12, 13, 14, 15]
    grouped = engine.generate(prompts, params, row_seeds=seeds)
    assert prefill_rows == [2]  # one prefill row per distinct prompt
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = engine.generate([prompt], params, row_seeds=[seed])
        length = int(alone.lengths[0])
        assert int(grouped.lengths[row]) == length
        assert torch.equal(grouped.completion_ids[row, :length], alone.completion_ids[0])
        torch.testing.assert_close(grouped.logprobs[row, :length], alone.logprobs[0], atol=1e-5, rtol=1e-5)


def test_static_cache_only_for_short_rollouts(monkeypatch):
    """transformers' StaticCache allocates and attends over the whole budget from the first step: by
    default it is used only up to CACHE_BLOCK columns, DynamicCache (grown as needed) beyond."""
    import gspo.rollout.hf as hf

    monkeypatch.setattr(hf, "CACHE_BLOCK", 12)
    engine = engine_for(tiny_qwen3(), decoder="hf")
    assert engine.static_cache is None  # the policy, not a fixed choice
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=5))  # 7 + 5 columns
    assert engine._decoder.static
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))  # 7 + 6 columns
    assert not engine._decoder.static


def test_lockstep_keeps_decoding_until_every_process_has_finished():
    """A model whose forward is a collective (FSDP2 shards, gspo.trainer.fsdp_load.sample_through) is sampled in
    lockstep: this process's rows all end at the prefill while another process's run 5 more steps, so it runs a
    forward for each of those steps (with one finished row), and returns exactly what it samples alone."""
    from gspo.rollout.hf import Lockstep

    model = with_head_bias(tiny_qwen3(), EOS, 1e4)  # EOS is certain: every row ends at its first token
    calls = count_forwards(model)
    params = SamplingParams(max_new_tokens=8)
    alone = engine_for(model, decoder="hf").generate(PROMPTS, params, row_seeds=[1, 2, 3, 4])
    calls.clear()
    others = iter([1] * 5 + [0])  # the other process's unfinished rows after each step
    inference = []
    lockstep = Lockstep(call=lambda fn: inference.append(torch.is_inference_mode_enabled()) or fn(),
                        total=lambda n: n + next(others))
    engine = engine_for(model, lockstep=lockstep, dtype=torch.bfloat16)  # the dtype the model computes in there
    rollout = engine.generate(PROMPTS, params, row_seeds=[1, 2, 3, 4])
    assert len(calls) == 1 + 5  # the prefill, then one decode step per step the other process still decoded
    for key in ("completion_ids", "completion_mask", "logprobs", "truncated"):
        assert torch.equal(getattr(rollout, key), getattr(alone, key)), key
    assert inference == [False]  # the call decides autograd (FSDP2's gather buffers must not be inference tensors)
    # no copy, whatever the dtype: the model itself, through transformers' forward (its modules gather the shards)
    assert engine.model is model and engine.shares_model and engine.native is None
    assert engine.info.name == "transformers' forward, bfloat16" and engine.info.weight_sync == "shared"


@pytest.mark.skipif(not prepacked_linear_supported(torch.device("cpu"), torch.bfloat16),
                    reason="this CPU's oneDNN has no native bfloat16 (the engine keeps a bfloat16 copy)")
def test_bfloat16_sampling_from_float32_weights_keeps_no_copy_and_samples_what_a_copy_samples():
    """On a CPU with prepacked bfloat16 weights the engine decodes from the float32 module itself (cast and packed
    per rollout): the same tokens and log-probabilities as an engine holding a bfloat16 copy, bit for bit, and
    weight updates seen at the next rollout without a sync."""
    model = tiny_qwen3()
    engine = engine_for(model, dtype=torch.bfloat16)
    copied = engine_for(model, dtype=torch.bfloat16, copy=True)
    assert engine.packs_from_model and engine.model is model and engine.info.weight_sync == "shared"
    assert not copied.packs_from_model and copied.model is not model
    assert "bfloat16" in engine.info.name and not engine.info.exact_logprobs
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    for _ in range(2):
        got, want = (e.generate(PROMPTS, params, row_seeds=[1, 2, 3, 4][: len(PROMPTS)]) for e in (engine, copied))
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert torch.equal(got.logprobs, want.logprobs)
        with torch.no_grad():  # a training step: the packing engine sees it, the copy after its sync
            model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
        copied.sync_weights(model)
    assert next(model.parameters()).dtype == torch.float32  # nothing cast in place
