"""End to end: ``gspo train rollout.engine=vllm`` completes, trains on vLLM's log-probs, resumes after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

SHORT = ["rollout.prompts_per_step=4", "rollout.group_size=4", "eval.size=8", "log.progress=false",
         "log.tensorboard=false"]


def _gspo(*args: str) -> list[str]:
    return [sys.executable, "-m", "gspo", "train", *args]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_with_vllm_on_its_logprobs(tmp_path):
    """Three steps with the in-process engine, old log-probs straight from vLLM, weights synced every step."""
    run_dir = tmp_path / "run"
    done = subprocess.run(_gspo("rollout.engine=vllm", "steps=3", "loss.old_logprobs=rollout", "checkpoint.every=0",
                                f"run_dir={run_dir}", *SHORT), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "vLLM" in done.stdout  # the start line names the engine
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and "lift/accuracy" in summary
    steps = [r for r in _records(run_dir) if r.get("step", 0) >= 1 and "sample/generate_s" in r]
    assert len(steps) == 3
    assert all(r["sync/weights_s"] > 0 for r in steps[1:])  # the sync after step k is reported with step k + 1


def test_resume_after_sigkill_restarts_the_engine(tmp_path):
    run_dir = tmp_path / "run"
    # 8 steps, killed at the first checkpoint from step 2 on (checkpoint.keep_last=2 deletes older ones, and a
    # step takes well under a second: poll often, and leave the run steps to do)
    args = ["rollout.engine=vllm", "steps=8", "checkpoint.every=1", f"run_dir={run_dir}", *SHORT]
    first = subprocess.Popen(_gspo(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def saved_from_step_2() -> bool:
        names = [p.name for p in (run_dir / "checkpoints").glob("step-*")]
        return any(n[5:].isdigit() and int(n[5:]) >= 2 for n in names)

    try:
        deadline = time.monotonic() + 600
        while not saved_from_step_2():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before step 2"
            time.sleep(0.05)
        assert first.poll() is None, "the first run finished before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    done = subprocess.run([sys.executable, "-m", "gspo", "train", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_two_processes_with_their_own_engines_match_one(tmp_path):
    """torchrun: each process drives its own in-process vLLM engine; 2 processes train like 1 (the same
    samples, from per-row seeds, and the same parameters after two steps, as tests/distributed checks
    for the built-in engine; per-process metrics such as clip fractions are averages of shards)."""
    from safetensors.torch import load_file

    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"run{nproc}"
        done = subprocess.run([sys.executable, "-m", "gspo", "train", "--nproc", str(nproc), "rollout.engine=vllm",
                               "steps=2", "checkpoint.every=0", f"run_dir={run_dir}", *SHORT],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        rewards = [r["reward/mean"] for r in _records(run_dir) if "loss/clip_frac" in r]
        runs[nproc] = rewards, load_file(run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
    assert len(runs[1][0]) == 2 and runs[1][0] == pytest.approx(runs[2][0], abs=1e-6)
    one, two = runs[1][1], runs[2][1]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_pipelined_sampling_with_vllm_in_process_and_as_a_server(tmp_path):
    """rollout.max_staleness=1 with vLLM as the sampler (docs/pipeline.md): the sampler process runs the
    engine (in-process vLLM there, or a client of a vLLM server it starts) and is the run's only engine,
    evaluation included. Batch k is sampled by the weights after update k-2, pi_old is vLLM's own
    log-probabilities, and the in-process engine and the server train alike (same seeds, same kernels)."""
    from safetensors.torch import load_file

    weights = {}
    for engine in ("vllm", "vllm-server"):
        run_dir = tmp_path / engine
        done = subprocess.run(_gspo(f"rollout.engine={engine}", "rollout.max_staleness=1", "steps=3",
                                    "checkpoint.every=0", f"run_dir={run_dir}", *SHORT),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "old log-probs from the sampler" in done.stdout + done.stderr
        steps = [r for r in _records(run_dir) if "pipeline/staleness" in r]
        assert [r["pipeline/staleness"] for r in steps] == [0.0, 1.0, 1.0]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and "lift/accuracy" in summary
        weights[engine] = load_file(run_dir / "checkpoints" / "step-00000003" / "model.safetensors")
    for name, tensor in weights["vllm"].items():
        torch.testing.assert_close(weights["vllm-server"][name], tensor, rtol=0, atol=1e-6, msg=name)
