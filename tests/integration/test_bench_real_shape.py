"""benchmarks/bench_real_shape.py end to end at its tiny shape (so the script cannot rot), and its limit formula."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_real_shape.py"


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_real_shape", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, variants: str, *extra: str) -> dict:
    """Run the script at the tiny shape; its results, its table and its printed log."""
    out = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--new-tokens", "8", "--rounds", "1",
                    "--warmup", "0", "--threads", "1", "--copy-bytes", str(2**24), "--variants", variants,
                    "--out", str(out), *extra], check=True, env=env, timeout=300, capture_output=True, text=True)
    return {"data": json.loads(out.read_text()), "table": _bench().table(out), "log": run.stdout}


def test_tiny_gspo_batch_end_to_end(tmp_path):
    result = _run(tmp_path, "gspo")
    case = result["data"]["cases"]["uneven-8"]
    gspo = case["variants"]["gspo"]
    assert gspo["s_per_batch"] > 0 and 0 < gspo["gen_tokens"] <= 16 * 8
    assert gspo["peak_mb"] > 0 and gspo["estimate_mb"] > 0 and 0 <= gspo["padding_share"] < 1
    assert gspo["precision"].startswith("precision: float32")  # < 50M parameters
    assert gspo["limit_s"] > 0
    cal = case["calibration"]
    assert cal["expected_mean_length"] == pytest.approx(cal["target_mean_length"], rel=1e-3)
    assert cal["h_k_same_sign_frac"] > 0.95  # the EOS shift moves every position's logit the same way
    assert "| uneven-8 | gspo |" in result["table"] and result["data"]["machine"]["bandwidth_gb_s"] > 0


def test_fixed_length_model_is_uncalibrated_and_reused_from_the_cache(tmp_path):
    cache = tmp_path / "models"
    first = _run(tmp_path, "gspo", "--fixed-length", "--model-cache", str(cache))
    case = first["data"]["cases"]["exact-8"]
    assert "skipped" in case["calibration"] and case["variants"]["gspo"]["gen_tokens"] == 16 * 8
    assert "building the model" in first["log"] and (cache / "tiny-fixed" / "calibration.json").exists()
    second = _run(tmp_path, "gspo", "--fixed-length", "--model-cache", str(cache))
    assert "building the model" not in second["log"] and "built earlier" in second["log"]
    assert second["data"]["cases"]["exact-8"]["variants"]["gspo"]["gen_tokens"] == 16 * 8


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is a benchmark-only extra")
def test_tiny_trl_batch_end_to_end(tmp_path):
    case = _run(tmp_path, "trl-fp32", "--fixed-length")["data"]["cases"]["exact-8"]
    assert case["variants"]["trl-fp32"]["gen_tokens"] == 16 * 8


def test_limit_counts_weights_per_step_kv_and_flops():
    bench = _bench()
    facts = {"matmul_params": 1_000_000, "layers": 2, "attn_width": 64, "kv_width": 32}
    machine = {"bandwidth_gb_s": 1.0, "gemm_gflops": {"float32": 1.0, "bfloat16": 4.0}}
    lengths, prompt = [4, 2], 3
    kv = (3 * 4 + 10) + (3 * 2 + 3)  # cache entries read: prompt x length + 1 + 2 + ... + length
    decode = 4 * 1_000_000 * 2 + kv * 2 * 2 * 32 * 2  # longest row's steps x bf16 weights, + KV
    flops = 2e6 * 4 * 3 + 8e6 * 12 + 4 * (2 * 2 * 64 * (7**2 + 5**2))
    assert bench.limit_seconds(facts, machine, lengths, prompt, 12, "bfloat16", "float32") == pytest.approx(
        decode / 1e9 + flops / 1e9)
