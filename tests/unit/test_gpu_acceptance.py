"""The GPU acceptance script (benchmarks/gpu_acceptance.py) runs on a machine without CUDA: every check is
SKIP with its reason and the script exits 0 (on a GPU it runs them: docs in the script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_acceptance.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its checks (minutes)")
def test_without_cuda_every_check_is_skipped_with_its_reason(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    results = [line for line in lines[1:-1]]
    assert results and all(line.startswith("SKIP") for line in results), done.stdout
    names = {line.split()[1] for line in results}
    assert {"install", "train-tiny", "eval", "agents", "moe-r3-ckpt", "bf16-1.7B", "multi-gpu"} <= names
    assert all("no CUDA" in line or "vllm" in line or "GPUs" in line for line in results)
    assert lines[-1].startswith("0 failed") and (tmp_path / "summary.json").exists()


def test_the_script_installs_without_dependencies_and_names_a_real_shape():
    text = SCRIPT.read_text()
    assert '"pip", "install", "--no-deps", "-e"' in text
    assert "num_hidden_layers=28" in text and "vocab_size=151936" in text  # Qwen3-1.7B's shape
