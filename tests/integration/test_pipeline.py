"""Pipelined sampling (rollout.max_staleness, trainer/pipeline.py): a sampler process runs ahead of the
update with bounded, deterministic staleness. Exact equalities on the tiny model, CPU, fixed seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gspo.checkpoint import find_latest_checkpoint
from gspo.cli import main
from gspo.config import load_config
from gspo.errors import ConfigError
from gspo.trainer.pipeline import decode_rollout, encode_rollout, plan_placement
from gspo.trainer.trainer import Trainer

from test_reliability import assert_same_weights, subprocess_env, train_steps_logged, weights

STEPS = 8  # a kill one step after a checkpoint must still land mid-run


@pytest.fixture(scope="module")
def args(tiny_model_dir, reward_module) -> list[str]:
    return [f"model={tiny_model_dir}", f"reward.functions={reward_module}:ones", f"steps={STEPS}",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "optim.minibatches=2",
            "optim.lr=1e-3", "eval.size=8", "log.progress=false", "log.tensorboard=false", "checkpoint.every=1"]


def final_weights(run_args: list[str], run) -> dict[str, torch.Tensor]:
    assert main(["train", *run_args, f"run_dir={run}"]) == 0
    return weights(find_latest_checkpoint(run))


@pytest.fixture(scope="module")
def pipelined(args, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run with max_staleness=1."""
    return final_weights([*args, "rollout.max_staleness=1"], tmp_path_factory.mktemp("pipelined") / "run")


def test_max_staleness_0_is_the_synchronous_loop_bitwise(args, tmp_path):
    default = final_weights(args, tmp_path / "default")
    explicit = final_weights([*args, "rollout.max_staleness=0"], tmp_path / "zero")
    assert_same_weights(explicit, default)
    trainer = Trainer.from_config(load_config(overrides=[*args, "rollout.max_staleness=0"]))
    assert trainer.pipeline is None  # no sampler process, nothing of the pipeline on the synchronous path


def test_max_staleness_1_is_bitwise_reproducible_and_really_stale(args, pipelined, tmp_path):
    again = final_weights([*args, "rollout.max_staleness=1"], tmp_path / "again")
    assert_same_weights(again, pipelined)
    synchronous = final_weights(args, tmp_path / "sync")
    assert any(not torch.equal(synchronous[k], pipelined[k]) for k in synchronous)  # other behaviour policies


def test_activation_checkpointing_trains_pipelined_as_without_it(args, pipelined, tmp_path):
    """Activation checkpointing registers transformers' input-gradient hook, a local function: the sampler process
    is started from a copy of the model without it (it was pickled along and the start failed). Recomputed
    activations give the same weights up to float rounding (Adam amplifies it over 8 steps)."""
    checkpointed = final_weights([*args, "rollout.max_staleness=1", "optim.gradient_checkpointing=true"],
                                 tmp_path / "checkpointed")
    assert checkpointed.keys() == pipelined.keys()
    for key in pipelined:
        torch.testing.assert_close(checkpointed[key], pipelined[key], rtol=0, atol=1e-4, msg=key)  # max 4e-6 seen


def test_staleness_metric_equals_s_after_warm_up_and_pi_old_is_the_sampler(args):
    trainer = Trainer.from_config(load_config(overrides=[*args, "rollout.max_staleness=2", "checkpoint.every=0"]))
    try:
        seen = []
        for step in range(STEPS):
            metrics = trainer.train_step()
            seen.append(metrics["pipeline/staleness"])
            assert metrics["pipeline/trainer_busy_s"] > 0 and metrics["pipeline/wait_s"] >= 0
            assert metrics["pipeline/sampler_busy_s"] > 0
            # a stale batch's first minibatch is not on-policy: no trainer-vs-sampler "mismatch" is claimed
            assert ("mismatch/token_abs_mean" in metrics) == (step == 0)
        assert seen == [0, 1] + [2] * (STEPS - 2)  # batch k sampled with the weights after update k-1-s
        assert trainer.old_logprobs_plan.source == "rollout"
    finally:
        trainer.close()


# One interpreter imports torch once and forks a child per attempt (as tests/integration/test_reliability.py
# does); each child runs `gspo train` (or --resume) and is SIGKILLed: ["after", n] as soon as checkpoint n is
# published (a batch is in flight: the resume must take it from the checkpoint), ["save", 0] inside the next
# checkpoint write. The pipeline's sampler process of each killed child must not survive it.
KILLER = textwrap.dedent(r"""
    import json, os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from gspo.cli import main

    spec = json.loads(sys.argv[1])
    run = spec["run"]
    checkpoints = os.path.join(run, "checkpoints")

    def listing(prefix):
        try:
            return {n for n in os.listdir(checkpoints) if n.startswith(prefix)}
        except FileNotFoundError:
            return set()

    def newest():
        return max((int(n[5:]) for n in listing("step-")), default=0)

    def start():
        argv = ["train", "--resume", run] if os.path.exists(os.path.join(run, "config.json")) else ["train", *spec["args"]]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = main(argv)
            finally:
                os._exit(code if isinstance(code, int) else 1)
        return pid

    kills = []
    for plan, n in spec["plan"]:
        before, leftovers = newest(), listing(".tmp-")
        pid = start()
        done = (lambda: newest() >= n) if plan == "after" else (lambda: bool(listing(".tmp-") - leftovers))
        while not done():
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                raise SystemExit(f"a child exited before it was killed: {kills}")
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills.append({"plan": plan, "from_step": before, "killed": os.WIFSIGNALED(status), "newest": newest()})
    _, status = os.waitpid(start(), 0)
    print(json.dumps({"kills": kills, "exit": os.waitstatus_to_exitcode(status)}))
""")


def test_resume_after_sigkill_ends_with_the_uninterrupted_pipelined_weights(args, pipelined, tmp_path, reward_module):
    run = tmp_path / "run"
    spec = {"args": [*args, "rollout.max_staleness=1", f"run_dir={run}"], "run": str(run),
            "plan": [["after", 2], ["save", 0], ["after", 5]]}
    done = subprocess.run([sys.executable, "-c", KILLER, json.dumps(spec)], capture_output=True, text=True,
                          env=subprocess_env(reward_module), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0, done.stderr[-3000:]
    assert all(k["killed"] for k in report["kills"]), report
    assert [k["from_step"] > 0 for k in report["kills"]] == [False, True, True], report
    assert_same_weights(weights(find_latest_checkpoint(run)), pipelined)
    assert train_steps_logged(run) == list(range(1, STEPS + 1))
    stale = [json.loads(line)["pipeline/staleness"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "pipeline/staleness" in line]
    assert stale == [0.0] + [1.0] * (STEPS - 1)


def test_checkpoint_holds_the_batch_in_flight_exactly(args, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *args, "steps=3", "checkpoint.every=2", "rollout.max_staleness=1", f"run_dir={run}"]) == 0
    state = json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    (entry,) = state["in_flight"]  # batch 2, sampled with the weights after update 1 while update 2 ran
    assert (entry["step"], entry["version"]) == (2, 1)
    rollout = decode_rollout(entry["rollout"])
    again = decode_rollout(encode_rollout(rollout))
    for name in ("prompt_ids", "completion_ids", "completion_mask", "logprobs", "truncated"):
        assert torch.equal(getattr(again, name), getattr(rollout, name))
    assert rollout.logprobs.dtype == torch.float32 and rollout.completion_mask.dtype == torch.bool


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(pid)


def test_the_sampler_process_stops_when_the_run_raises(args, tmp_path, monkeypatch):
    from gspo.trainer import run as run_module

    pids = []
    real = Trainer.train_step

    def failing(self):
        pids.append(self.pipeline.engine.pid)
        if self.state.step == 1:
            raise RuntimeError("boom in step 2")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run_module.train(load_config(overrides=[*args, "rollout.max_staleness=1"]), tmp_path / "run")
    assert pids and wait_gone(pids[0], timeout=1.0)  # closed by train(), not by garbage collection


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_sampler_process_dies_with_a_sigkilled_trainer(args, tmp_path, reward_module):
    script = textwrap.dedent(f"""
        import sys, time
        from gspo.config import load_config
        from gspo.trainer.trainer import Trainer
        trainer = Trainer.from_config(load_config(overrides={[*args, 'rollout.max_staleness=1']!r}))
        trainer.train_step()
        print(trainer.pipeline.engine.pid, flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=subprocess_env(reward_module))
    try:
        sampler = int(child.stdout.readline())
        assert alive(sampler)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        assert wait_gone(sampler)
    finally:
        child.kill()


@pytest.mark.parametrize("override, message", [
    ("loss.old_logprobs=recompute", "pi_old of a stale batch"),
    ("algorithm=dapo", "DAPO dynamic sampling"),
    ("rollout.max_staleness=-1", "must be >= 0"),
])
def test_invalid_pipeline_settings_name_the_key(args, override, message):
    base = [a for a in args if not a.startswith("rollout.max_staleness")]
    overrides = [*base, override] if "max_staleness" in override else [*base, "rollout.max_staleness=1", override]
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_placement_gives_sampler_and_trainer_their_own_cores():
    trainer, sampler = plan_placement(1_000_000, cores=[0, 1])
    assert (trainer.cores, sampler.cores, trainer.threads, sampler.threads) == ((0,), (1,), 1, 1)
    trainer, sampler = plan_placement(100_000_000, cores=list(range(8)))
    assert (trainer.cores, sampler.cores, trainer.threads, sampler.threads) == (tuple(range(6)), (6, 7), 6, 2)
    trainer, sampler = plan_placement(1_000_000, cores=[3])
    assert trainer.cores == sampler.cores == ()


def test_the_progress_line_shows_both_halves_and_the_wait():
    from gspo.trainer.progress import Progress

    line = Progress(10, enabled=False).plain_line(3, {"reward/mean": 0.4, "pipeline/sampler_busy_s": 0.8,
                                                      "pipeline/trainer_busy_s": 1.25, "pipeline/wait_s": 0.01})
    assert "reward 0.400  s/t/wait 0.80/1.25/0.01s" in line


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_weight_push_travels_in_parts_and_samples_as_the_whole_weights(tiny_model_dir, monkeypatch, dtype):
    """The sampler process receives the weights in parts of about PUSH_BYTES (neither process serialises the whole
    model at once) and samples with exactly the weights pushed, as an in-process engine in the same dtype does;
    it holds one copy of them, in the engine's dtype (a bfloat16 sampler used to keep its float32 copy too)."""
    import functools

    from gspo.models.load import load_model, load_tokenizer
    from gspo.rollout import subprocess as sub
    from gspo.rollout.base import SamplingParams
    from gspo.trainer.build import build_engine

    config = load_config(None, [f"model={tiny_model_dir}", f"rollout.engine_dtype={dtype}"])
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    engine = sub.SubprocessEngine(functools.partial(build_engine, config), model, tokenizer, tiny_model_dir,
                                  dtype=getattr(torch, dtype))
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # the sampler holds the old weights until the push
        monkeypatch.setattr(sub, "PUSH_BYTES", 4096)
        sent = []
        put = engine._requests.put
        monkeypatch.setattr(engine._requests, "put", lambda message: (sent.append(message[0]), put(message))[1])
        engine.sync_weights(model)
        assert sent.count("weights") > 2  # many parts, the last one marked
        prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=6)
        there = engine.generate(prompts, params, row_seeds=[1, 2])
        here = build_engine(config, model, tokenizer, tiny_model_dir).generate(prompts, params, row_seeds=[1, 2])
        assert torch.equal(there.completion_ids, here.completion_ids)
        assert torch.equal(there.logprobs, here.logprobs)
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        held, other = engine.held_bytes(), {"float32": "bfloat16", "bfloat16": "float32"}[dtype]
        weights = params * getattr(torch, dtype).itemsize
        assert weights <= held[dtype] <= weights + buffers + 1024  # a few small constants besides
        assert held.get(other, 0) <= buffers + 1024  # no second copy (the float32 buffers stay float32)
    finally:
        engine.close()
