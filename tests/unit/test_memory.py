"""The peak-memory estimate: parameter counts, measured peaks, the refusal before loading."""

from __future__ import annotations

import json

import pytest

from gspo.errors import ConfigError
from gspo.memory import GB, ModelShape, RunShape, check_memory, estimate, refusal

QWEN3_06B = {"num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True}
# benchmarks/measure_memory.py: a random ~103M-parameter Qwen3 (151,936 vocabulary, tied), 4 prompts x 4
# responses of exactly N tokens, 4 minibatches, float32, two rollout batches, one thread, each case alone in
# its own process; peak RSS (ru_maxrss) on the 2-core AMD EPYC (avx512_bf16) shared machine of this work.
MEASURED = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
            "intermediate_size": 1536, "head_dim": 64, "vocab_size": 151936, "tie_word_embeddings": True}
MEASURED_PEAKS = [  # (response tokens, prompt tokens, compute dtype, measured peak RSS in bytes)
    (8, 7, "float32", 2_508_521_472),
    (128, 7, "float32", 2_617_282_560),
    (512, 7, "float32", 3_751_165_952),
    (64, 7, "float32", int(2.36 * 2**30)),  # these two: the same run, peaks per phase sampled with psutil
    (64, 7, "bfloat16", int(2.74 * 2**30)),  # (peak in the pi_old pass: autocast's casts + the head's logits)
]
# Not pinned: bfloat16 with 512-token responses measured 4.32 GiB against an estimate of 3.31 (-23%), see
# docs/memory.md ("Known gap").
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
    with pytest.raises(ConfigError, match="no single knob fits; together optim.micro_batch_tokens"):
        check_memory(model, run, available=int(8 * GB))


def test_token_budget_and_checkpointing_shrink_the_activations():
    model = ModelShape.from_config(QWEN3_06B)
    plain = estimate(model, _run(response_tokens=1024))
    budget = estimate(model, _run(response_tokens=1024, micro_tokens=2 * 1044))
    checkpointed = estimate(model, _run(response_tokens=1024, checkpointing=True))
    assert budget.parts["activations"] == pytest.approx(plain.parts["activations"] / 2, rel=0.1)
    assert checkpointed.total < budget.total < plain.total


def test_fsdp_shards_the_optimizer_and_ddp_does_not():
    model = ModelShape.from_config(QWEN3_06B)
    ddp = estimate(model, _run(processes=8, strategy="ddp", device="cuda"))
    fsdp = estimate(model, _run(processes=8, strategy="fsdp", device="cuda"))
    assert fsdp.parts["optimizer"] * 8 == pytest.approx(ddp.parts["optimizer"], rel=1e-6)
    assert "whole copy" in fsdp.parts and "whole copy" not in ddp.parts


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(tmp_path, tiny_overrides, monkeypatch):
    # a directory with only an 8B-shaped config.json: the refusal must come before any weight is read
    config = {**QWEN3_06B, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 36,
              "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    overrides = [o for o in tiny_overrides if not o.startswith("model=")] + [f"model={tmp_path}", "optim.dtype=float32"]
    monkeypatch.setattr("gspo.memory.available_bytes", lambda device: 16 * GB)
    with pytest.raises(ConfigError, match=r"more than the 16.0 GB of available RAM; .*lora.rank=16"):
        Trainer.from_config(load_config(None, overrides), run_dir=None)
