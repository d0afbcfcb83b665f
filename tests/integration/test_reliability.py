"""Faults on a real training run: SIGKILL at random moments, a corrupt checkpoint, non-finite steps,
SIGTERM, and a run directory that tries to make gspo execute code. Every resumed run must end with
exactly the weights of an uninterrupted one (CPU, fixed seed)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gspo.checkpoint import CorruptCheckpointWarning, find_latest_checkpoint
from gspo.cli import main
from gspo.config import load_config
from gspo.trainer import update
from gspo.trainer.trainer import Trainer

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
STEPS = 10  # long enough that kills land mid-run, short enough for seconds per run


@pytest.fixture(scope="module")
def base_args(tiny_model_dir, reward_module) -> list[str]:
    """The tiny run of tests/conftest.py, checkpointing every step."""
    return [f"model={tiny_model_dir}", f"reward.functions={reward_module}:ones", f"steps={STEPS}",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "optim.minibatches=2",
            "optim.lr=1e-3", "eval.size=8", "log.progress=false", "log.tensorboard=false", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def reference(base_args, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *base_args, f"run_dir={run}"]) == 0
    return weights(find_latest_checkpoint(run))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def train_steps_logged(run: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl (evaluation records excluded), in file order."""
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line still being written by the training process
            continue
        if "reward/mean" in record:
            steps.append(record["step"])
    return steps


def subprocess_env(reward_module: str) -> dict[str, str]:
    reward_dir = Path(importlib.import_module(reward_module).__file__).parent
    # One thread, as in this process (conftest.py): thread count can change float reductions.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(reward_dir)]), "OMP_NUM_THREADS": "1"}


# -- SIGKILL at random moments -------------------------------------------------------------------------

# Importing torch + transformers costs 5-15 s on a loaded machine, so the kills do not each start a new
# interpreter: one launcher imports once and forks a child per attempt, which runs exactly what
# `python -m gspo train ...` runs (gspo.cli.main). Each child is SIGKILLed, and the next one resumes the
# way a user would. Kill moments, one plan per attempt:
#   early  a random moment between building the trainer and the first checkpoint write
#   save   inside a checkpoint write (as soon as a new .tmp- directory shows, plus 0-2 ms)
#   step   after the next checkpoint is published, a random delay of up to 1.5 x the step time the
#          child itself last logged: sampling, updating, logging or saving, at a random phase
# Progress per attempt is bounded (<= ~3 steps), so every child is still running when it is killed.
LAUNCHER = textwrap.dedent(r"""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)  # before forking: children must not inherit a thread pool
    from transformers.models.qwen3 import modeling_qwen3  # noqa: F401  the lazy imports, paid once
    from gspo.cli import main
    import gspo.trainer.run  # noqa: F401

    spec = json.loads(sys.argv[1])
    run, chooser = spec["run"], random.Random(spec["seed"])
    checkpoints, config = os.path.join(run, "checkpoints"), os.path.join(run, "config.json")

    def start(argv):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def listing(prefix):
        try:
            return {name for name in os.listdir(checkpoints) if name.startswith(prefix)}
        except FileNotFoundError:
            return set()

    def newest():
        return max((int(name[5:]) for name in listing("step-")), default=0)

    def wait_for(condition, pid, timeout=float("inf")):
        end = time.monotonic() + timeout
        while not condition() and time.monotonic() < end:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                raise SystemExit(f"a child exited before it was killed: {kills}")
            time.sleep(0.0005)

    def last_step_seconds():
        lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
        return [json.loads(line) for line in lines if '"time/step_s"' in line][-1]["time/step_s"]

    def user_argv():  # --resume once the run directory exists, else start again
        return ["train", "--resume", run] if os.path.exists(config) else ["train", *spec["args"]]

    kills = []
    for plan in spec["plan"]:
        from_step, leftovers = newest(), listing(".tmp-")
        pid, started = start(user_argv()), time.monotonic()
        new_save = lambda: listing(".tmp-") - leftovers
        if plan == "early":
            wait_for(lambda: os.path.exists(config), pid)
            wait_for(new_save, pid, timeout=chooser.uniform(0, 1.0))
        elif plan == "save":
            wait_for(new_save, pid)
            time.sleep(chooser.uniform(0, 0.002))
        else:
            wait_for(lambda: newest() > from_step, pid)
            time.sleep(chooser.uniform(0, 1.5 * last_step_seconds()))
        mid_save = bool(new_save())
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills.append({"plan": plan, "killed": os.WIFSIGNALED(status), "mid_save": mid_save, "from_step": from_step,
                      "newest_after": newest(), "seconds": round(time.monotonic() - started, 2)})
    _, status = os.waitpid(start(user_argv()), 0)
    print(json.dumps({"kills": kills, "exit": os.waitstatus_to_exitcode(status)}))
""")


def test_sigkill_at_random_moments_then_resume_ends_with_the_uninterrupted_weights(
        tmp_path, base_args, reference, reward_module):
    run = tmp_path / "run"
    spec = {"args": [*base_args, f"run_dir={run}"], "run": str(run), "seed": 7,
            "plan": ["early", "save", "step", "save", "step"]}
    done = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(spec)], capture_output=True, text=True,
                          env=subprocess_env(reward_module), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kills = report["kills"]
    assert report["exit"] == 0, done.stderr[-3000:]
    assert all(k["killed"] for k in kills), kills  # every attempt really died mid-run
    assert kills[0]["newest_after"] == 0 and "has no checkpoint yet" in done.stderr  # before any checkpoint
    assert sum(k["mid_save"] for k in kills) >= 2, kills  # inside checkpoint writes
    assert kills[-1]["from_step"] > 0, kills  # and after resuming from a checkpoint
    assert_same_weights(weights(find_latest_checkpoint(run)), reference)
    assert train_steps_logged(run) == list(range(1, STEPS + 1))  # redone steps are logged once
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]


# -- a corrupt checkpoint ----------------------------------------------------------------------------

def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, base_args, reference, capsys):
    run = tmp_path / "run"
    assert main(["train", *base_args, "steps=3", f"run_dir={run}"]) == 0
    newest = run / "checkpoints" / "step-00000003" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the weights, size unchanged: only the sha256 can tell
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.warns(CorruptCheckpointWarning, match=r"step-00000003.*model\.safetensors.*sha256"):
        assert main(["train", "--resume", str(run), f"steps={STEPS}"]) == 0
    assert "resuming from" in capsys.readouterr().err.split("step-00000002")[0]
    assert_same_weights(weights(find_latest_checkpoint(run)), reference)
    assert train_steps_logged(run) == list(range(1, STEPS + 1))


def test_a_checkpoint_with_an_unknown_trainer_state_is_refused(tmp_path, base_args, capsys):
    run = tmp_path / "run"
    assert main(["train", *base_args, "steps=1", f"run_dir={run}"]) == 0
    checkpoint = run / "checkpoints" / "step-00000001"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "from_the_future": 1}))
    rewrite_manifest(checkpoint)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "steps=2"]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.json does not fit" in err and "Traceback" not in err


# -- non-finite loss or gradient ---------------------------------------------------------------------

class NaNLoss:
    """Wraps a loss function; the calls (counted from 1) for which ``bad(n)`` holds return a NaN loss."""

    def __init__(self, loss, bad) -> None:
        self.loss, self.bad, self.calls = loss, bad, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.loss(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if self.bad(self.calls) else out


def _poison_gspo(monkeypatch, bad) -> None:
    """The trainer's GSPO loss returns NaN on the calls ``bad(n)`` selects (n counts loss calls)."""
    real = update.get_objective
    poisoned = dataclasses.replace(real("gspo"), loss=NaNLoss(real("gspo").loss, bad))
    monkeypatch.setattr(update, "get_objective", lambda name: poisoned if name == "gspo" else real(name))


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped_counted_and_logged(tmp_path, tiny_overrides, monkeypatch, kind):
    trainer = Trainer.from_config(load_config(None, tiny_overrides), run_dir=tmp_path)  # 2 optimizer steps per train step
    trainer.train_step()
    params = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    adam_steps = [float(s["step"]) for s in trainer.parts.optimizer.state.values()]
    if kind == "loss":
        _poison_gspo(monkeypatch, lambda n: True)
    else:
        hook = next(iter(params.values())).register_hook(lambda grad: torch.full_like(grad, float("inf")))
    metrics = trainer.train_step()
    monkeypatch.undo() if kind == "loss" else hook.remove()

    assert [h["optim/skipped"] for h in trainer.last_updates] == [1.0, 1.0]
    assert metrics["optim/skipped"] == 1.0 and metrics["optim/skipped_total"] == 2
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # neither step touched the weights
    assert [float(s["step"]) for s in trainer.parts.optimizer.state.values()] == adam_steps  # nor Adam's state
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/skipped"] for r in logged] == [0.0, 1.0]

    metrics = trainer.train_step()  # finite again: trains, and the streak is over
    assert metrics["optim/skipped"] == 0.0 and metrics["optim/skipped_total"] == 2
    assert trainer.updater.nonfinite_streak == 0
    assert all(not torch.equal(p, before[n]) and torch.isfinite(p).all() for n, p in params.items())


def test_a_streak_of_nonfinite_steps_stops_the_run_and_keeps_the_last_good_checkpoint(
        tmp_path, base_args, monkeypatch, capsys):
    _poison_gspo(monkeypatch, lambda n: n >= 5)  # from step 3
    run = tmp_path / "run"
    assert main(["train", *base_args, "steps=5", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("gspo train: error:")]
    assert "training diverged at step 4: 3 optimizer steps in a row had a non-finite loss" in line
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step-00000003'}" in line and "optim.lr" in line

    assert find_latest_checkpoint(run).name == "step-00000003"  # verifies (sha256) and is the newest
    step2, step3 = (weights(run / "checkpoints" / f"step-0000000{s}") for s in (2, 3))
    assert_same_weights(step3, step2)  # step 3 was skipped whole: its checkpoint holds step 2's weights
    assert all(torch.isfinite(t).all() for t in step3.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["optim/skipped"]) for r in records if "reward/mean" in r] == [(1, 0.0), (2, 0.0), (3, 1.0)]
    assert not (run / "summary.json").exists()


# -- SIGTERM -----------------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_resume_finishes(
        tmp_path, base_args, reference, reward_module):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "gspo", "train", *base_args, f"run_dir={run}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(reward_module))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(train_steps_logged(run)) >= 2:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM" in err and f"Resume with: gspo train --resume {run}" in err
    stopped = train_steps_logged(run)[-1]
    assert 2 <= stopped < STEPS and f"interrupted at step {stopped} of {STEPS}" in err
    assert find_latest_checkpoint(run).name == f"step-{stopped:08d}"  # the step in flight was finished and saved

    assert main(["train", "--resume", str(run)]) == 0
    assert_same_weights(weights(find_latest_checkpoint(run)), reference)
    assert train_steps_logged(run) == list(range(1, STEPS + 1))


# -- nothing in a run directory is executed ------------------------------------------------------------

def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest match the files again, as someone with write access to the run could."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json"):
        data = path.read_bytes()
        manifest["files"][path.relative_to(checkpoint).as_posix()] = {
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_code_planted_in_a_checkpoint_is_never_executed(tmp_path, base_args, capsys):
    run = tmp_path / "run"
    assert main(["train", *base_args, "steps=1", f"run_dir={run}"]) == 0
    checkpoint = run / "checkpoints" / "step-00000001"
    marker = tmp_path / "executed"
    (checkpoint / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    rewrite_manifest(checkpoint)

    # Resuming reads only safetensors weights and weights_only states from the checkpoint.
    assert main(["train", "--resume", str(run), "steps=2"]) == 0
    # Evaluating builds the model from the checkpoint directory, which asks for its own code: refused.
    capsys.readouterr()
    poisoned = run / "checkpoints" / "step-00000002"
    (poisoned / "config.json").write_text(json.dumps(config))
    (poisoned / "modeling_evil.py").write_text((checkpoint / "modeling_evil.py").read_text())
    rewrite_manifest(poisoned)
    assert main(["eval", str(run), "samples=1", "k=1", "eval.size=2"]) == 2
    assert "custom code is never executed" in capsys.readouterr().err
    assert not marker.exists()


def test_tensorboard_forgets_the_redone_steps_after_a_resume(tmp_path, base_args):
    # A run that died after step 4 with its newest checkpoint at step 2 redoes steps 3 and 4 on resume:
    # TensorBoard must show each step once, with the values of the resumed run (metrics.jsonl is cut too).
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = [a for a in base_args if not a.startswith(("steps=", "checkpoint.every=", "log.tensorboard="))]
    args += ["log.tensorboard=true", "checkpoint.every=2", f"run_dir={run}"]
    assert main(["train", *args, "steps=4"]) == 0
    newest = find_latest_checkpoint(run)
    assert newest.name.endswith("4")
    import shutil

    shutil.rmtree(newest)  # as if the process had died before writing it, and before its summary
    (run / "summary.json").unlink()
    assert main(["train", *args, "steps=4", "--resume", str(run)]) == 0
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("reward/mean")]
    assert len(list((run / "tensorboard").iterdir())) >= 2  # the resumed run wrote its own event file
    assert steps == [1, 2, 3, 4]
    logged = {r["step"]: r["reward/mean"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "reward/mean" in r}
    assert [event.value for event in accumulator.Scalars("reward/mean")] == pytest.approx([logged[s] for s in steps])


def test_resume_keeps_the_refreshed_kl_reference(tiny_overrides, tmp_path):
    # loss.ref_refresh_steps: the KL reference is a snapshot of an earlier step. A resume must get that
    # snapshot back (it reset it to the initial model: review D5), whether it was taken before the
    # checkpoint's step (saved as reference.safetensors) or at it (the checkpoint's own weights).
    from gspo.trainer.run import train

    overrides = [o for o in tiny_overrides if not o.startswith(("checkpoint.", "steps="))] + [
        "algorithm=grpo", "loss.beta=0.5", "loss.ref_refresh_steps=2", "optim.lr=3e-2", "eval.size=4",
        "eval.greedy=false", "checkpoint.every=1", "checkpoint.keep_last=10"]
    train(load_config(None, [*overrides, "steps=5"]), tmp_path / "straight")
    expected = weights(tmp_path / "straight" / "checkpoints" / "step-00000005")
    for stop in (3, 2):  # the reference was taken at step 2: before the checkpoint, then at it
        run = tmp_path / f"stopped-at-{stop}"
        train(load_config(None, [*overrides, f"steps={stop}"]), run)
        saved = {p.name for p in (run / "checkpoints" / f"step-{stop:08d}").iterdir()}
        assert ("reference.safetensors" in saved) == (stop == 3)
        train(load_config(None, [*overrides, "steps=5"]), run, resume=True)
        assert_same_weights(weights(run / "checkpoints" / "step-00000005"), expected)
