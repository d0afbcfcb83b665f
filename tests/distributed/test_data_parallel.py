"""Several processes, one result: gloo on the CPU, spawned from pytest.

The same seed and global batch must give the same parameters with 1 or 2 processes (the losses get
global normalisers, sampling is seeded per response, minibatches are drawn from one global
permutation), metrics are reduced across processes, and checkpoints saved by 2 processes load in 1.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str, sys_path: list[str]) -> None:
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gspo import distributed as dist
    from gspo.config import load_config
    from gspo.trainer.run import train
    from gspo.trainer.trainer import Trainer

    dist.maybe_init_distributed()
    try:
        config = load_config(None, overrides)
        if config.run_dir:
            train(config, config.run_dir)
        else:
            trainer = Trainer.from_config(config, None)
            metrics = [trainer.train_step() for _ in range(config.steps)]
            whole = dist.full_model_state(trainer.model)  # FSDP: the shards gathered to rank 0 (a collective)
            if rank == 0:
                engine_dtype = str(next(trainer.parts.engine.model.parameters()).dtype)  # the built-in engine's copy
                torch.save({"params": {n: p.detach().clone() for n, p in whole.items()},
                            "metrics": metrics, "engine_dtype": engine_dtype}, out)
    finally:
        dist.shutdown()


def _spawn(world: int, overrides: list[str], out) -> None:
    mp.start_processes(_worker, args=(world, _free_port(), overrides, str(out), list(sys.path)), nprocs=world,
                       join=True, start_method="spawn")


def _single(overrides: list[str]):
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, overrides), None)
    metrics = [trainer.train_step() for _ in range(trainer.config.steps)]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, metrics


@pytest.fixture
def dp_overrides(tiny_overrides):
    return [o for o in tiny_overrides if not o.startswith("rollout.prompts_per_step")] + ["rollout.prompts_per_step=4"]


def test_two_processes_match_one_process(tmp_path, dp_overrides):
    _spawn(2, dp_overrides, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one_params, one_metrics = _single(dp_overrides)
    for name, tensor in one_params.items():
        torch.testing.assert_close(two["params"][name], tensor, rtol=0, atol=1e-5, msg=name)
    # metrics are reduced across processes: the 2-process mean reward is the global batch's
    for a, b in zip(two["metrics"], one_metrics):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)


def test_batch_advantage_scale_two_processes_match_one(tmp_path, dp_overrides):
    # loss.advantage_scale=batch divides by the std of the whole global batch, not of one process's share
    overrides = [*dp_overrides, "loss.advantage_scale=batch"]
    _spawn(2, overrides, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one_params, _ = _single(overrides)
    for name, tensor in one_params.items():
        torch.testing.assert_close(two["params"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_save_with_two_processes_load_with_one(tmp_path, dp_overrides):
    run = tmp_path / "run"
    args = [o for o in dp_overrides if not o.startswith(("checkpoint.", "steps="))]
    _spawn(2, [*args, "steps=2", "checkpoint.every=1", f"run_dir={run}"], tmp_path / "unused.pt")
    assert (run / "summary.json").exists() and json.loads((run / "summary.json").read_text())["steps"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss/clip_frac"' in line for line in lines) == 2  # rank 0 alone writes
    from gspo.trainer.run import train
    from gspo.config import load_config

    summary = train(load_config(None, [*args, "steps=3", f"run_dir={run}"]), run, resume=True)
    assert summary["steps"] == 3


def test_fsdp2_matches_one_process_and_its_checkpoint_loads_in_one(tmp_path, dp_overrides):
    _spawn(2, [*dp_overrides, "distributed.strategy=fsdp"], tmp_path / "fsdp.pt")
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    one_params, _ = _single(dp_overrides)
    for name, tensor in one_params.items():
        torch.testing.assert_close(fsdp["params"][name], tensor, rtol=0, atol=1e-5, msg=name)

    run = tmp_path / "run"
    args = [o for o in dp_overrides if not o.startswith(("checkpoint.", "steps="))]
    _spawn(2, [*args, "distributed.strategy=fsdp", "steps=2", "checkpoint.every=1", f"run_dir={run}"],
           tmp_path / "unused.pt")
    from gspo.config import load_config
    from gspo.trainer.run import train

    summary = train(load_config(None, [*args, "distributed.strategy=fsdp", "steps=3", f"run_dir={run}"]), run,
                    resume=True)
    assert summary["steps"] == 3


def test_dapo_dynamic_sampling_two_processes_match_one(tmp_path, dp_overrides):
    # 2-token completions: many groups have all-equal rewards, so dynamic sampling needs extra rounds,
    # agreed globally (every process runs the same rounds and keeps the groups one process would)
    overrides = [o for o in dp_overrides if not o.startswith("rollout.max_new_tokens")]
    overrides += ["algorithm=dapo", "rollout.max_new_tokens=2", "steps=3"]
    _spawn(2, overrides, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one_params, one_metrics = _single(overrides)
    assert any(m["dapo/rounds"] > 1 for m in one_metrics)  # the extra rounds really happened
    for a, b in zip(two["metrics"], one_metrics):
        assert a["dapo/rounds"] == b["dapo/rounds"] and a["dapo/kept_group_frac"] == pytest.approx(b["dapo/kept_group_frac"])
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)
    for name, tensor in one_params.items():
        torch.testing.assert_close(two["params"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_fsdp2_sampler_keeps_its_configured_precision(tmp_path, dp_overrides):
    _spawn(2, [*dp_overrides, "distributed.strategy=fsdp", "rollout.engine_dtype=bfloat16", "steps=1"],
           tmp_path / "fsdp.pt")
    assert torch.load(tmp_path / "fsdp.pt", weights_only=True)["engine_dtype"] == "torch.bfloat16"
