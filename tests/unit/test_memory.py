"""The peak-memory estimate: parameter counts, measured peaks, the refusal before loading."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from gspo.errors import ConfigError
from gspo.memory import GB, ModelShape, RunShape, estimate
from gspo.memory_plan import check_memory, plan, refusal

QWEN3_06B = {"num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True}
QWEN3_8B = {**QWEN3_06B, "num_hidden_layers": 36, "hidden_size": 4096, "intermediate_size": 12288,
            "num_attention_heads": 32, "tie_word_embeddings": False}
# benchmarks/measure_memory.py: a random ~103M-parameter Qwen3 (151,936 vocabulary, tied), 4 prompts x 4
# responses of exactly N tokens, 4 minibatches, float32, two rollout batches, one thread, each case alone in
# its own process; peak RSS (ru_maxrss) on the 2-core AMD EPYC (avx512_bf16) shared machine of this work.
MEASURED = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
            "intermediate_size": 1536, "head_dim": 64, "vocab_size": 151936, "tie_word_embeddings": True}
MEASURED_PEAKS = [  # (response tokens, prompt tokens, compute dtype, measured peak RSS in bytes)
    (8, 7, "float32", 2_508_521_472),
    (64, 7, "float32", int(2.36 * 2**30)),  # these two: the same run, peaks per phase sampled with psutil
    (64, 7, "bfloat16", int(2.74 * 2**30)),  # (peak in the pi_old pass: autocast's casts + the head's logits)
]
# ... and every case benchmarks/measure_memory.py wrote to its results file (float32 and bfloat16, 128 and 512
# response tokens; the bfloat16 512-token case was 23% above the estimate before the LM head's two live
# chunks of logits were counted)
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_cpu.json"
MEASURED_PEAKS += [(c["new_tokens"], c["prompt_tokens"], c["dtype"], c["peak_rss_bytes"])
                   for c in json.loads(RESULTS.read_text())["cases"] if not c.get("extra")]
# issue 21's own figures (benchmarks/bench_vs_trl.py's method, 2-core Xeon with AMX): Qwen3-0.6B's shape, 4 x 4
# responses of exactly 128 tokens behind ~8-token prompts, 4 minibatches, peak RSS 12.1 GB (fp32) / 14.1 GB (bf16)
ISSUE_PEAKS = [("float32", 12.1e9), ("bfloat16", 14.1e9)]


def _run(**kw) -> RunShape:
    base = dict(responses=16, minibatch_rows=4, micro_rows=0, micro_tokens=0, prompt_tokens=20, response_tokens=128)
    return RunShape(**{**base, **kw})


def test_parameter_count_matches_transformers():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert ModelShape.from_config(config.to_dict()).params == sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(QWEN3_06B).params == 596_049_920  # Qwen3-0.6B's published count


def test_moe_parameter_count_matches_the_embedded_moe():
    from gspo.models.load import EMBEDDED, load_model

    model = load_model(EMBEDDED["tiny-moe"])
    shape = ModelShape.from_dir(EMBEDDED["tiny-moe"])
    assert shape.experts > 0 and shape.params == sum(p.numel() for p in model.parameters())


def test_both_dtypes_are_pinned_at_two_lengths():
    for dtype in ("float32", "bfloat16"):
        assert len({response for response, _, d, _ in MEASURED_PEAKS if d == dtype and response >= 64}) >= 2, dtype


@pytest.mark.parametrize("response, prompt, dtype, measured", MEASURED_PEAKS)
def test_estimate_within_20_percent_of_the_measured_peak(response, prompt, dtype, measured):
    run = _run(prompt_tokens=prompt, response_tokens=response, compute=dtype, sampler=dtype)
    assert estimate(ModelShape.from_config(MEASURED), run).total == pytest.approx(measured, rel=0.2)


@pytest.mark.parametrize("dtype, measured", ISSUE_PEAKS)
def test_estimate_within_20_percent_of_the_issue_s_06b_peaks(dtype, measured):
    run = _run(prompt_tokens=8, compute=dtype, sampler=dtype)
    assert estimate(ModelShape.from_config(QWEN3_06B), run).total == pytest.approx(measured, rel=0.2)


def test_the_issue_s_oom_is_refused_with_the_knobs_that_fit():
    # Qwen3-0.6B, 16 x 1,024 tokens, fp32 was killed at 23.3 GB on a 24 GB machine
    model = ModelShape.from_config(QWEN3_06B)
    run = _run(response_tokens=1024)
    message = refusal(model, run, available=int(20 * GB))
    assert message.startswith("this run needs about ")
    assert "more than the 20.0 GB of available RAM" in message
    for knob in ("optim.micro_batch_tokens=1044", "optim.gradient_checkpointing=true"):
        assert knob in message
    assert refusal(model, _run(response_tokens=128), available=int(20 * GB)) is None
    with pytest.raises(ConfigError, match="no single knob fits; together optim.micro_batch_tokens=1044, "
                                          r"optim.gradient_checkpointing=true, optim.dtype=bfloat16, lora.rank=16 fit"):
        check_memory(model, run, available=int(8 * GB))
    with pytest.raises(ConfigError, match=r"no single knob fits, and together .* still need \d+\.\d GB: fewer "
                                          "responses per step, shorter rollout.max_new_tokens, a machine with more"):
        check_memory(model, run, available=int(2 * GB))


def test_token_budget_and_checkpointing_shrink_the_activations():
    model = ModelShape.from_config(QWEN3_06B)
    plain = estimate(model, _run(response_tokens=1024))
    budget = estimate(model, _run(response_tokens=1024, micro_tokens=2 * 1044))
    checkpointed = estimate(model, _run(response_tokens=1024, checkpointing=True))
    assert budget.parts["activations"] == pytest.approx(plain.parts["activations"] / 2, rel=0.1)
    assert checkpointed.total < budget.total < plain.total


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_fsdp_shards_weights_gradients_and_optimizer_by_the_process_count(processes):
    model = ModelShape.from_config(QWEN3_8B)
    run = _run(processes=processes, device="cuda", compute="bfloat16", sampler="bfloat16", checkpointing=True)
    one = estimate(model, _run(device="cuda", compute="bfloat16", sampler="bfloat16", checkpointing=True))
    ddp = estimate(model, replace(run, strategy="ddp"))
    fsdp = estimate(model, replace(run, strategy="fsdp"))
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp.parts[part] * processes == pytest.approx(one.parts[part], rel=1e-6)
        assert ddp.parts[part] == one.parts[part]  # DDP: the whole state on every process
    assert ddp.parts["DDP buckets"] == one.parts["gradients"] and "DDP buckets" not in fsdp.parts
    # FSDP2: the built-in sampler keeps its own whole bf16 copy; the gathered bf16 layers replace autocast's casts
    assert fsdp.parts["sampler copy"] == 2 * model.params
    sharded = sum(one.parts[p] for p in ("weights", "gradients", "optimizer"))
    assert ddp.total - fsdp.total > sharded * (1 - 1 / processes)


def test_fsdp_per_gpu_memory_falls_about_1_over_n_for_the_sharded_state():
    model = ModelShape.from_config(QWEN3_8B)
    totals = {n: estimate(model, _run(processes=n, strategy="fsdp", device="cuda", compute="bfloat16",
                                      sampler="bfloat16", checkpointing=True)).total for n in (2, 4, 8)}
    state = 16 * model.params  # float32 weights, gradients and AdamW: what FSDP2 shards
    assert totals[2] - totals[4] == pytest.approx(state / 4, rel=0.05)
    assert totals[4] - totals[8] == pytest.approx(state / 8, rel=0.05)


def test_auto_keeps_one_forward_per_minibatch_and_no_checkpointing_when_it_fits():
    decided = plan(ModelShape.from_config(QWEN3_06B), _run(), checkpointing="auto", micro_batch_tokens=-1,
                   available=int(20 * GB))
    assert (decided.checkpointing, decided.micro_batch_tokens, decided.notes) == (False, 0, ())
    assert decided.describe().startswith("memory: ~") and "checkpointing off, token budget off" in decided.describe()


def test_auto_picks_a_token_budget_before_checkpointing():
    # the issue's OOM: Qwen3-0.6B, 16 x 1,024 tokens, float32, 20 GB
    model, run = ModelShape.from_config(QWEN3_06B), _run(response_tokens=1024)
    decided = plan(model, run, checkpointing="auto", micro_batch_tokens=-1, available=int(20 * GB))
    assert not decided.checkpointing
    assert 0 < decided.micro_batch_tokens < 4 * 1044 and decided.micro_batch_tokens % 1044 == 0
    assert decided.estimate.total <= 0.9 * 20 * GB
    more = replace(run, micro_tokens=decided.micro_batch_tokens + 1044)
    assert estimate(model, more).total > 0.9 * 20 * GB  # the largest budget of whole responses that fits
    assert "token budget auto: one forward per minibatch needs" in decided.describe()


def test_auto_budget_leaves_room_for_the_kept_heap_where_forwards_stay_large():
    # the 0.6B shape, 16 x 1,024 tokens, 23 GB: the largest budget that fits (2 responses per forward) leaves no
    # room for the heap's holes (gspo.host_memory: 1.38x slower lean at this shape); one response per forward does
    from gspo.memory_plan import HEAP_REUSE_MIN_TOKENS, heap_reuse_fits

    model, run = ModelShape.from_config(QWEN3_06B), _run(response_tokens=1024)
    settings = dict(checkpointing="auto", micro_batch_tokens=-1, available=int(23 * GB))
    lean = plan(model, run, **settings)
    kept = plan(model, run, **settings, heap_reuse=True)
    assert lean.micro_batch_tokens == 2 * 1044 and not heap_reuse_fits(lean)
    assert kept.micro_batch_tokens == 1044 and heap_reuse_fits(kept) and not kept.checkpointing
    assert kept.estimate.total < lean.estimate.total
    assert not heap_reuse_fits(replace(kept, estimate=estimate(model, replace(run, micro_tokens=2 * 1044))))
    assert re.search(r"one forward per minibatch needs \d+\.\d GB, \d+\.\d GB with the host heap kept for reuse",
                     kept.describe())
    # a run that keeps the heap with one forward per minibatch is left alone
    short = plan(model, _run(response_tokens=128), **settings, heap_reuse=True)
    assert short.micro_batch_tokens == 0 and heap_reuse_fits(short) and not short.notes
    # forwards below HEAP_REUSE_MIN_TOKENS are not worth the heap: the plain choice (lean) stays
    tight = int(estimate(model, replace(run, micro_tokens=1044)).total / 0.9) + GB  # one response fits, not its holes
    assert plan(model, run, **{**settings, "available": tight}, heap_reuse=True).micro_batch_tokens == 1044
    small = _run(response_tokens=HEAP_REUSE_MIN_TOKENS // 4 - 20, minibatch_rows=4)  # four responses: 512 tokens
    whole_need = estimate(model, small).total
    assert plan(model, small, **{**settings, "available": int(whole_need / 0.9) + 1},
                heap_reuse=True).micro_batch_tokens == 0  # no budget of fewer than 512 tokens for the heap
    # CUDA: the host heap is not in question
    assert plan(model, replace(run, device="cuda"), **{**settings, "available": int(80 * GB)},
                heap_reuse=True).micro_batch_tokens == 0


def test_auto_heap_budget_starts_from_the_fewest_responses_that_reach_512_tokens():
    # 300-token responses (320 with the prompt): one per forward is under HEAP_REUSE_MIN_TOKENS, two are not; with
    # room for two and the heap's holes, but not for a whole minibatch of four, the budget is two responses (the
    # search started at one, found it below 512 tokens, and fell back to the plain budget on the lean heap)
    from gspo.memory_plan import _heap_total, heap_reuse_fits

    model, run = ModelShape.from_config(QWEN3_06B), _run(response_tokens=300)
    two = estimate(model, replace(run, micro_tokens=2 * 320))
    available = int(_heap_total(two, None, 1) / 0.9) + 1
    assert _heap_total(estimate(model, replace(run, micro_tokens=3 * 320)), None, 1) > 0.9 * available
    decided = plan(model, run, checkpointing="auto", micro_batch_tokens=-1, available=available, heap_reuse=True)
    assert decided.micro_batch_tokens == 2 * 320 and heap_reuse_fits(decided) and not decided.checkpointing
    assert plan(model, run, checkpointing="auto", micro_batch_tokens=-1, available=available).micro_batch_tokens != 640


def test_auto_turns_checkpointing_on_when_one_response_per_forward_does_not_fit():
    model, run = ModelShape.from_config(QWEN3_06B), _run(response_tokens=4096)
    one_row = estimate(model, replace(run, micro_tokens=4096 + 20)).total
    decided = plan(model, run, checkpointing="auto", micro_batch_tokens=-1, available=int(one_row / 0.9) - GB)
    assert decided.checkpointing and decided.estimate.total <= 0.9 * decided.available
    assert "checkpointing auto: on, one response per forward needs" in decided.describe()
    # the user's own budget: checkpointing alone decides
    decided = plan(model, run, checkpointing="auto", micro_batch_tokens=4116, available=int(one_row / 0.9) - GB)
    assert decided.checkpointing and decided.micro_batch_tokens == 4116


def test_auto_checkpoints_models_of_1b_and_more_on_cuda():
    model = ModelShape.from_config(QWEN3_8B)
    decided = plan(model, _run(device="cuda", lora_rank=16), checkpointing="auto", available=int(200 * GB))
    assert decided.checkpointing and "on for 8.2B params on CUDA" in decided.describe()
    small = plan(ModelShape.from_config(QWEN3_06B), _run(device="cuda"), checkpointing="auto", available=int(80 * GB))
    assert not small.checkpointing
    assert "free GPU memory" in small.describe()


def test_checkpointing_false_that_cannot_fit_is_refused_with_the_knob():
    model, run = ModelShape.from_config(QWEN3_06B), _run(response_tokens=4096)
    one_row = estimate(model, replace(run, micro_tokens=4096 + 20)).total
    with pytest.raises(ConfigError, match=r"optim.gradient_checkpointing=true \(\d+\.\d GB\)"):
        plan(model, run, checkpointing="false", micro_batch_tokens=-1, available=one_row - GB)
    with pytest.raises(ConfigError, match=r"already with activation checkpointing and optim.micro_batch_tokens=4116, "
                                          r"chosen by auto"):
        plan(model, run, checkpointing="auto", micro_batch_tokens=-1, available=int(3 * GB))


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(tmp_path, tiny_overrides, monkeypatch):
    # a directory with only an 8B-shaped config.json: the refusal must come before any weight is read
    config = {**QWEN3_06B, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 36,
              "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    overrides = [o for o in tiny_overrides if not o.startswith("model=")] + [f"model={tmp_path}", "optim.dtype=float32"]
    monkeypatch.setattr("gspo.memory_plan.available_bytes", lambda device: 16 * GB)
    with pytest.raises(ConfigError, match=r"more than the 16.0 GB of available RAM; .*lora.rank=16"):
        Trainer.from_config(load_config(None, overrides), run_dir=None)


def test_the_trainer_follows_the_memory_plan(tiny_overrides, monkeypatch):
    from gspo import memory_plan
    from gspo.config import load_config
    from gspo.trainer.run import _setup_text
    from gspo.trainer.trainer import Trainer

    plain = Trainer.from_config(load_config(None, tiny_overrides), run_dir=None)  # the tiny job: both off, as before
    assert not any(layer.gradient_checkpointing for layer in plain.model.model.layers)
    assert plain.parts.updater.micro_batch_tokens == 0 and not plain.parts.old_logprobs.trim
    assert "checkpointing off, token budget off" in _setup_text(plain)
    decide = memory_plan.plan
    monkeypatch.setattr("gspo.memory_plan.plan", lambda *a, **kw: replace(decide(*a, **kw), checkpointing=True,
                                                                     micro_batch_tokens=24))
    forced = Trainer.from_config(load_config(None, tiny_overrides), run_dir=None)
    assert all(layer.gradient_checkpointing for layer in forced.model.model.layers)
    assert forced.parts.updater.micro_batch_tokens == 24 and forced.parts.old_logprobs.trim
    assert "checkpointing on, token budget 24" in _setup_text(forced)


def test_a_ddp_run_on_gpus_that_cannot_fit_is_told_to_shard():
    # Qwen3-8B, 8 x H100, DDP: the whole float32 state (and DDP's buckets) on every GPU; the layers' casts are recast
    run = _run(responses=8, minibatch_rows=2, prompt_tokens=256, response_tokens=1024, compute="bfloat16",
               sampler="bfloat16", checkpointing=True, processes=8, device="cuda")
    message = refusal(ModelShape.from_config(QWEN3_8B), run, available=int(80 * GB))
    assert message.startswith("this run needs about 173.")
    assert "DDP buckets 30.5" in message
    assert "per process at its peak, more than the 80.0 GB of free GPU memory" in message
    assert "any one of these fits: distributed.strategy=fsdp (" in message


# -- FSDP2's built-in sampler: a whole copy, or sampling through the shards (rollout.sampler_weights) ---------------

QWEN3_30B_A3B = {**QWEN3_06B, "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 768, "tie_word_embeddings": False}


def _fsdp8(**kw) -> RunShape:
    return _run(**{**dict(processes=8, strategy="fsdp", device="cuda", compute="bfloat16", sampler="bfloat16",
                           checkpointing=True, sampler_can_shard=True), **kw})


def test_sampling_through_the_shards_drops_the_whole_copy_and_counts_the_gathered_layers():
    model = ModelShape.from_config(QWEN3_30B_A3B)
    copy, shards = estimate(model, _fsdp8()), estimate(model, _fsdp8(sampler_weights="shards"))
    assert copy.parts["sampler copy"] == 2 * model.params and "sampler copy" not in shards.parts
    # the rollout holds the root (embeddings, head) and two decoder layers gathered in bfloat16, no gradients
    layer = model.attention_params + model.mlp_params + 2 * model.hidden
    root = 2 * model.vocab * model.hidden + model.hidden
    many = dict(responses=64, minibatch_rows=1, response_tokens=8192)  # sampling is the largest transient
    kv = estimate(model, _fsdp8(**many)).parts.get("KV cache + logits")
    sampled = estimate(model, _fsdp8(**many, sampler_weights="shards")).parts
    assert kv is not None and sampled["KV cache + logits + gathered layers"] == kv + 2 * (root + 2 * layer)
    assert copy.total - shards.total > 0.9 * 2 * model.params  # 61 GB of copy gone, a few GB of layers added
    # one process, or DDP: nothing is sharded, a lower-precision sampler keeps its copy whatever the key says
    ddp = _run(processes=8, compute="float32", sampler="bfloat16", sampler_weights="shards")
    assert estimate(model, ddp).parts["sampler copy"] == 2 * model.params


def test_auto_keeps_the_whole_copy_when_it_fits_and_samples_through_the_shards_when_not():
    model = ModelShape.from_config(QWEN3_30B_A3B)
    fits = plan(model, _fsdp8(), checkpointing="auto", micro_batch_tokens=-1, available=int(200 * GB),
                sampler_weights="auto")
    assert fits.sampler_weights == "copy" and "sampler copy" in fits.estimate.parts
    assert "shards" not in fits.describe()
    h100 = plan(model, _fsdp8(), checkpointing="auto", micro_batch_tokens=-1, available=int(79 * GB),
                sampler_weights="auto")
    assert h100.sampler_weights == "shards" and "sampler copy" not in h100.estimate.parts
    assert h100.estimate.total <= 0.9 * 79 * GB
    assert "sampler through the shards" in h100.describe()
    assert re.search(r"sampler weights auto: through the shards, with a whole copy \d+\.\d GB", h100.describe())
    # neither fits: the refusal describes the run without the copy, and says so
    with pytest.raises(ConfigError, match=r"no whole copy\)$"):
        plan(model, _fsdp8(), checkpointing="auto", micro_batch_tokens=-1, available=int(40 * GB),
             sampler_weights="auto")
    # not possible (another engine, dtypes that differ, ...): auto keeps the copy, and the refusal says so
    with pytest.raises(ConfigError) as refused:
        plan(model, _fsdp8(sampler_can_shard=False), checkpointing="auto", micro_batch_tokens=-1,
             available=int(79 * GB), sampler_weights="auto")
    assert "rollout.sampler_weights=shards" not in str(refused.value)


def test_a_copy_that_cannot_fit_is_refused_naming_rollout_sampler_weights_shards():
    model = ModelShape.from_config(QWEN3_30B_A3B)
    with pytest.raises(ConfigError, match=r"sampler copy 56\.\d.*rollout\.sampler_weights=shards \(\d+\.\d GB\)"):
        plan(model, _fsdp8(), checkpointing="true", micro_batch_tokens=-1, available=int(79 * GB),
             sampler_weights="copy")


def test_sampling_through_the_shards_is_refused_where_it_cannot_run():
    from gspo.config import load_config
    from gspo.memory_plan import sampler_shards_refusal
    from gspo.precision import PrecisionPolicy

    bf16 = PrecisionPolicy(compute="bfloat16", sampler="bfloat16")
    fsdp = ["distributed.strategy=fsdp"]
    assert sampler_shards_refusal(load_config(None, fsdp), bf16, 2) is None
    cases = [(load_config(None, fsdp), bf16, 1, "2 or more processes"),
             (load_config(None, []), bf16, 2, "distributed.strategy=fsdp"),
             (load_config(None, [*fsdp, "rollout.engine=vllm"]), bf16, 2, "rollout.engine=vllm"),
             (load_config(None, fsdp), PrecisionPolicy(compute="float32", sampler="bfloat16"), 2,
              "rollout.engine_dtype=auto or float32"),
             (load_config(None, [*fsdp, "rollout.decoder=native"]), bf16, 2, "rollout.decoder=auto")]
    for config, precision, processes, fix in cases:
        assert fix in sampler_shards_refusal(config, precision, processes)
    assert "agent episodes" in sampler_shards_refusal(load_config(None, fsdp), bf16, 2, agents=True)


def test_rollout_sampler_weights_shards_outside_fsdp_is_refused_naming_the_key(tiny_overrides, monkeypatch):
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    monkeypatch.setattr("gspo.trainer.build.load_model", lambda *a, **k: pytest.fail("refused after the load"))

    with pytest.raises(ConfigError, match=r"rollout.sampler_weights=shards: the model is sharded only under "
                                          r"distributed.strategy=fsdp with 2 or more processes"):
        Trainer.from_config(load_config(None, [*tiny_overrides, "rollout.sampler_weights=shards"]), run_dir=None)
    with pytest.raises(ConfigError, match="rollout.sampler_weights"):
        load_config(None, ["rollout.sampler_weights=whole"])


# -- the pipelined mode's sampler process (rollout.max_staleness >= 1) ---------------------------------------------
# benchmarks/measure_memory.py with --extra rollout.max_staleness=1 loss.old_logprobs=rollout steps=3 (a weight
# push reaches the sampler): the trainer's peak RSS and the sampler process's own (VmHWM)
SAMPLER_PEAKS = [(c["dtype"], c["prompt_tokens"], c["new_tokens"], c["peak_rss_bytes"], c["sampler_peak_rss_bytes"])
                 for c in json.loads(RESULTS.read_text())["cases"] if "sampler_peak_rss_bytes" in c]


def test_the_plan_counts_the_sampler_process():
    from gspo.memory import CPU_RUNTIME_BYTES, PUSH_BYTES, sampler_estimate

    model = ModelShape.from_config(QWEN3_06B)
    run = _run(compute="bfloat16", sampler="bfloat16", sampler_process=True)
    sampler = sampler_estimate(model, run)
    kv = 16 * 28 * 2 * 8 * 128 * (20 + 128) * 2 + 3 * 16 * 151936 * 4  # KV cache in bfloat16 + (rows, V) logits
    packed = 2 * (28 * (1024 * (2 * 2048 + 2 * 1024) + 3 * 1024 * 3072) + 151936 * 1024)  # layers' + head's
    part = PUSH_BYTES + 2 * 151936 * 1024  # a push part closes after the tensor that crosses PUSH_BYTES
    assert sampler.parts == {"runtime": CPU_RUNTIME_BYTES, "weights": 2 * model.params,  # one copy, engine's dtype
                             "KV cache + logits + packed weights": kv + packed} and kv + packed > 2 * part
    assert sampler_estimate(model, replace(run, sampler="float32")).parts["weight push"] == 2 * (
        PUSH_BYTES + 4 * 151936 * 1024)  # float32: nothing prepacked, the push part is the larger transient
    alone = plan(model, replace(run, sampler_process=False), available=int(64 * GB))
    both = plan(model, run, available=int(64 * GB))
    assert alone.sampler is None and both.sampler.total == sampler.total
    assert both.estimate.parts["sampler copy"] == 2 * model.params  # the trainer's in-process engine (evaluation)
    assert f"~{both.estimate.total / GB:.1f} + {sampler.total / GB:.1f} (sampler process) of 64.0 GB" in both.describe()
    for engine in ("vllm", "vllm-server"):  # vLLM's sampler process: its own memory, not estimated
        assert sampler_estimate(model, replace(run, engine=engine)) is None


def test_a_run_that_fits_in_one_process_but_not_two_is_refused_naming_max_staleness_0():
    from gspo.memory import sampler_estimate

    model = ModelShape.from_config(QWEN3_06B)
    run = _run(compute="bfloat16", sampler="bfloat16", sampler_process=True, micro_tokens=148, checkpointing=True)
    trainer, sampler = estimate(model, run).total, sampler_estimate(model, run).total
    available = trainer + sampler // 2  # the trainer alone fits, with the sampler process it does not
    with pytest.raises(ConfigError, match=r"\) in the trainer \+ \d+\.\d GB \(.*\) in the sampler process "
                                          r"\(rollout.max_staleness > 0\).* rollout.max_staleness=0 \("):
        plan(model, run, checkpointing="true", micro_batch_tokens=148, available=available)
    assert refusal(model, replace(run, sampler_process=False), available) is None


def test_run_shape_reads_the_pipelined_mode_and_the_engine():
    from gspo.config import load_config
    from gspo.precision import PrecisionPolicy

    bf16 = PrecisionPolicy(compute="bfloat16", sampler="bfloat16")
    run = RunShape.from_config(load_config(None, ["rollout.max_staleness=1"]), bf16)
    assert run.sampler_process and run.engine == "hf"
    cpu = RunShape.from_config(load_config(None, ["rollout.engine=vllm", "rollout.vllm_kv_cache_gb=2"]), bf16)
    assert (cpu.engine, cpu.sampler, cpu.engine_cache_bytes) == ("vllm", "float32", 2 * GB)  # vLLM's CPU auto
    gpu = RunShape.from_config(load_config(None, ["rollout.engine=vllm"]), bf16, device="cuda")
    assert (gpu.sampler, gpu.engine_cache_bytes) == ("bfloat16", 0)


def test_vllm_runs_count_vllm_s_memory_not_the_built_in_engine_s():
    """vLLM holds its own weights and KV cache (rollout/vllm): no built-in "sampler copy" or KV cache in the trainer.
    On a GPU its memory is its gpu_memory_utilization share; on the CPU, in this process, its weights in its
    dtype and the KV cache space it is given; a server (or the pipelined sampler process) holds them elsewhere."""
    model = ModelShape.from_config(QWEN3_06B)
    hf = estimate(model, _run(compute="bfloat16", sampler="bfloat16", device="cuda"))
    gpu = estimate(model, _run(compute="bfloat16", sampler="bfloat16", device="cuda", engine="vllm"))
    assert "sampler copy" in hf.parts and "sampler copy" not in gpu.parts
    assert not any("KV cache" in name for name in gpu.parts)
    assert gpu.total == hf.total - hf.parts["sampler copy"]  # the training transients decide at this shape
    cpu = estimate(model, _run(compute="bfloat16", engine="vllm", engine_cache_bytes=GB))
    assert cpu.parts["vLLM engine"] == 4 * model.params + GB and "sampler copy" not in cpu.parts
    for elsewhere in (dict(engine="vllm-server"), dict(engine="vllm", sampler_process=True)):
        assert "vLLM engine" not in estimate(model, _run(compute="bfloat16", engine_cache_bytes=GB, **elsewhere)).parts


def test_both_dtypes_of_the_pipelined_mode_are_measured():
    assert {dtype for dtype, *_ in SAMPLER_PEAKS} == {"float32", "bfloat16"}


@pytest.mark.parametrize("dtype, prompt, response, trainer, sampler", SAMPLER_PEAKS)
def test_pipelined_estimates_within_20_percent_of_the_measured_peaks(dtype, prompt, response, trainer, sampler):
    from gspo.memory import sampler_estimate

    model = ModelShape.from_config(MEASURED)
    run = _run(prompt_tokens=prompt, response_tokens=response, compute=dtype, sampler=dtype, sampler_process=True)
    assert sampler_estimate(model, run).total == pytest.approx(sampler, rel=0.2)
    assert estimate(model, run).total == pytest.approx(trainer, rel=0.2)  # float32: the pushed parts decide


def test_a_cpu_bfloat16_sampler_that_packs_the_training_weights_holds_no_copy():
    """gspo.rollout.hf: on a CPU in bfloat16 the native decoder casts and packs the policy's own weights at every
    rollout, so the estimate has no sampler copy (and counts the packed weights while sampling); a model it does
    not decode natively, LoRA, FSDP2 or a float32 sampler keep what they had."""
    from gspo.memory import NATIVE_MODEL_TYPES
    from gspo.rollout.native import SUPPORTED_MODEL_TYPES

    assert NATIVE_MODEL_TYPES == SUPPORTED_MODEL_TYPES
    native = ModelShape.from_config({**QWEN3_06B, "model_type": "qwen3", "hidden_act": "silu"})
    other = ModelShape.from_config({**QWEN3_06B, "model_type": "gemma3"})
    assert native.native and not other.native and not ModelShape.from_config(QWEN3_06B).native
    bf16 = _run(compute="bfloat16", sampler="bfloat16")
    assert "sampler copy" not in estimate(native, bf16).parts
    assert estimate(native, bf16).parts.keys() == estimate(other, bf16).parts.keys() - {"sampler copy"}
    assert estimate(other, bf16).parts["sampler copy"] == 2 * other.params
    for run in (replace(bf16, lora_rank=16), replace(bf16, strategy="fsdp", processes=2),
                replace(bf16, device="cuda")):
        assert "sampler copy" in estimate(native, run).parts, run
