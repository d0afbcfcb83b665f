"""The precision policy: ``auto`` as a pure decision, the cached GEMM probe, the start line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gspo import precision
from gspo.precision import DeviceFacts, PrecisionPolicy, ProbeTimings, decide, resolve_precision

AMX = DeviceFacts("cpu", "Intel Xeon", frozenset({"amx_bf16", "avx512_bf16"}))
AVX512_BF16 = DeviceFacts("cpu", "AMD EPYC", frozenset({"avx512_bf16"}))
AVX2 = DeviceFacts("cpu", "old Xeon")
BIG, SMALL = 596_000_000, 1_000_000  # Qwen3-0.6B's shape; the embedded tiny model


@pytest.mark.parametrize("facts, timings, params, dtype, reason", [
    (AMX, ProbeTimings(4.0, 1.05), BIG, "bfloat16", "AMX: bf16 GEMM 3.8x fp32"),
    (AVX512_BF16, ProbeTimings(2.5, 1.0), BIG, "bfloat16", "AVX512-BF16: bf16 GEMM 2.5x fp32"),
    (AVX512_BF16, ProbeTimings(1.2, 1.0), BIG, "float32", "AVX512-BF16: bf16 GEMM only 1.2x fp32"),  # flags mislead
    (AVX2, None, BIG, "float32", "no AMX / AVX512-BF16: bf16 would be emulated"),
    (AVX2, ProbeTimings(1.0, 3.0), BIG, "float32", "no AMX / AVX512-BF16: bf16 would be emulated"),
    (AMX, None, BIG, "bfloat16", "AMX, not measured"),
    (AMX, ProbeTimings(4.0, 1.0), SMALL, "float32", "1M params < 50M: GEMMs too small for bf16"),  # tests, main job
    (DeviceFacts("cuda", "H100", cuda_bf16=True), None, BIG, "bfloat16", "CUDA bf16"),
    (DeviceFacts("cuda", "V100", cuda_bf16=False), None, BIG, "float32", "no native CUDA bf16"),
    (DeviceFacts("cuda", "H100", cuda_bf16=True), None, SMALL, "float32", "1M params < 50M: GEMMs too small for bf16"),
    (DeviceFacts("mps"), None, BIG, "float32", "mps: bf16 not chosen automatically"),
])
def test_decide_table(facts, timings, params, dtype, reason):
    assert decide(facts, timings, params) == (dtype, reason)


def test_the_threshold_is_the_model_size(monkeypatch):
    assert decide(AMX, ProbeTimings(4.0, 1.0), precision.MIN_BF16_PARAMS - 1)[0] == "float32"
    assert decide(AMX, ProbeTimings(4.0, 1.0), precision.MIN_BF16_PARAMS)[0] == "bfloat16"


def test_probe_is_cached_per_cpu_and_torch_version(tmp_path):
    calls = []

    def probe():
        calls.append(1)
        return ProbeTimings(0.004, 0.001)

    first = precision.cached_probe(AMX, tmp_path, probe=probe)
    again = precision.cached_probe(AMX, tmp_path, probe=probe)
    assert first == again == ProbeTimings(0.004, 0.001) and len(calls) == 1
    precision.cached_probe(AVX512_BF16, tmp_path, probe=probe)  # another CPU model: its own entry
    assert len(calls) == 2
    entries = json.loads((tmp_path / "precision-probe.json").read_text())
    assert len(entries) == 2 and all(f"torch {torch.__version__}" in key for key in entries)
    (tmp_path / "precision-probe.json").write_text("not json")  # a damaged cache is measured again
    assert precision.cached_probe(AMX, tmp_path, probe=probe).speedup == pytest.approx(4.0) and len(calls) == 3


def test_cache_lives_in_the_user_cache_dir_not_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("GSPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_path() == tmp_path / "gspo" / "precision-probe.json"
    monkeypatch.setenv("GSPO_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert precision.cache_path() == tmp_path / "elsewhere" / "precision-probe.json"


def test_small_models_stay_float32_without_probing(monkeypatch):
    monkeypatch.setattr(precision, "probe_gemm", lambda *a, **k: pytest.fail("a small model must not probe"))
    policy = resolve_precision("auto", "auto", torch.device("cpu"), SMALL)
    assert (policy.compute, policy.sampler, policy.master) == ("float32", "float32", "float32")
    assert policy.autocast_dtype is None


def test_auto_follows_the_probe_and_the_sampler_follows_compute(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "device_facts", lambda device: AMX)
    monkeypatch.setattr(precision, "probe_gemm", lambda *a, **k: ProbeTimings(0.0038, 0.001))
    policy = resolve_precision("auto", "auto", torch.device("cpu"), BIG, cache_dir=tmp_path)
    assert (policy.compute, policy.sampler) == ("bfloat16", "bfloat16") and policy.autocast_dtype == torch.bfloat16
    assert policy.describe() == "precision: bfloat16 compute, fp32 master (AMX: bf16 GEMM 3.8x fp32)"
    mixed = resolve_precision("auto", "float32", torch.device("cpu"), BIG, cache_dir=tmp_path)
    assert mixed.describe() == "precision: bfloat16 compute, float32 sampler, fp32 master (AMX: bf16 GEMM 3.8x fp32)"
    configured = resolve_precision("float32", "auto", torch.device("cpu"), BIG)
    assert configured == PrecisionPolicy("float32", "float32", "configured")


def test_the_real_probe_is_short():
    timings = precision.probe_gemm(size=128, repeats=1)
    assert timings.float32_s > 0 and timings.bfloat16_s > 0


def test_start_line_names_the_precision(tiny_overrides):
    from gspo.config import load_config
    from gspo.trainer.run import _setup_text
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, tiny_overrides), run_dir=None)
    assert trainer.parts.precision.compute == "float32"  # the tiny model: float32 whatever the CPU
    assert re.search(r"; precision: float32 compute, fp32 master \([0-9.]+M params < 50M: GEMMs too small for bf16\)(;|$)",
                     _setup_text(trainer))


def test_tf32_only_for_float32_compute_on_a_cuda_gpu_that_has_it():
    from gspo.precision import use_tf32

    ampere = DeviceFacts("cuda", "H100", cuda_bf16=True)
    assert use_tf32(ampere, "float32")
    assert not use_tf32(ampere, "bfloat16")  # bf16 autocast: its GEMMs are bf16 already
    assert not use_tf32(DeviceFacts("cuda", "V100", cuda_bf16=False), "float32")  # no TF32 before sm80
    assert not use_tf32(DeviceFacts("cpu", flags=frozenset({"amx_bf16"})), "float32")  # nothing on a CPU
    policy = PrecisionPolicy(compute="float32", sampler="float32", reason="configured", tf32=True)
    assert policy.matmul == "tf32" and "TF32 matmuls" in policy.describe()
    assert PrecisionPolicy().matmul == "float32" and "TF32" not in PrecisionPolicy().describe()
    assert resolve_precision("float32", "auto", torch.device("cpu"), 10**9).tf32 is False


def test_an_explicit_float32_stays_true_float32_on_a_tf32_gpu(monkeypatch):
    from gspo import precision

    monkeypatch.setattr(precision, "device_facts", lambda device: DeviceFacts("cuda", "A100", cuda_bf16=True))
    assert precision.resolve_precision("float32", "auto", torch.device("cuda"), 10**9).tf32 is False
    assert precision.resolve_precision("auto", "auto", torch.device("cuda"), 10**6).tf32 is True  # a tiny model


def test_tf32_makes_auto_pi_old_recompute():
    # the sampler's float32 log-probabilities are not the trainer's to float32 rounding under TF32 matmuls
    from gspo.rollout.base import EngineInfo
    from gspo.trainer.old_logprobs import plan_old_logprobs

    engine = EngineInfo(name="hf", exact_logprobs=True)
    assert plan_old_logprobs("auto", engine=engine, training_dtype="float32", dropout=False, moe=False).source == "rollout"
    plan = plan_old_logprobs("auto", engine=engine, training_dtype="tf32", dropout=False, moe=False)
    assert plan.source == "recompute" and plan.reason == "tf32 training"
