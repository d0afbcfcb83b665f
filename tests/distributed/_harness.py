"""What the multi-process tests share: N gloo processes on the CPU, spawned from pytest, and training runs in them.

:func:`spawn` runs a test's worker in ``world`` spawned processes, each joined to one process group
(``MASTER_ADDR`` / ``MASTER_PORT`` on a free local port, ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, one
thread, the parent's ``sys.path``) and shut down after, and fails instead of hanging on a deadlock;
:func:`save_rank` / :func:`load_ranks` carry each rank's results back. :func:`spawn_runs` trains configs
one after the other in the processes and returns rank 0's weights and metrics, :func:`single` the same
in this process, for the N-versus-1 comparisons.

Weights are compared with AdamW's epsilon raised to :data:`ADAM_EPS` in every run, 1 and N processes alike:
float sums in another order differ by rounding, and with the default 1e-8 Adam turns that noise in a
gradient element near zero into a step of up to the learning rate (one element of a q_proj moved by
1.6e-5 at lr 1e-3 in 2 steps). The comparison is of the gradients the processes produce, not of Adam's
normalisation.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

ADAM_EPS = 1e-4  # see the module docstring
SPAWN_TIMEOUT_S = 600  # a deadlock (ranks running different numbers of collectives) fails instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple, sys_path: list[str]) -> None:
    """One spawned process: the environment torch.distributed reads, the process group, ``fn``, the shutdown."""
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gspo import distributed as dist

    dist.maybe_init_distributed()
    try:
        fn(rank, world, *args)
    finally:
        dist.shutdown()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes of one gloo process group; fail (not hang)
    on a deadlock; an exception in a process is raised here."""
    context = mp.start_processes(_entry, args=(world, free_port(), fn, args, list(sys.path)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} processes still running after {SPAWN_TIMEOUT_S} s: a deadlock (collectives "
                        f"that differ between ranks?) in {fn.__name__}{args[:1]}")


def save_rank(obj, out: str, rank: int) -> None:
    """One process's results, for :func:`load_ranks`."""
    torch.save(obj, f"{out}.{rank}")


def load_ranks(out, world: int, *, weights_only: bool = True) -> list:
    """Every process's results saved by :func:`save_rank`, by rank."""
    return [torch.load(f"{out}.{rank}", weights_only=weights_only) for rank in range(world)]


def _trainer(overrides: list[str]):
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, overrides), None)
    for group in trainer.parts.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    return trainer


def train_steps(overrides: list[str]) -> dict:
    """Train ``config.steps`` steps: the whole weights, each step's metrics and each optimizer step's."""
    from gspo import distributed as dist

    trainer = _trainer(overrides)
    metrics, updates = [], []
    for _ in range(trainer.config.steps):
        metrics.append(trainer.train_step())
        updates.append(trainer.last_updates)
    whole = dist.full_model_state(trainer.model)  # FSDP: the shards gathered to rank 0 (a collective)
    engine_dtype = str(next(trainer.parts.engine.model.parameters()).dtype)  # the built-in engine's copy
    return {"params": {n: p.detach().clone() for n, p in whole.items()}, "metrics": metrics,
            "updates": updates, "engine_dtype": engine_dtype}


def _runs_worker(rank: int, world: int, cases: list[list[str]], out: str) -> None:
    from gspo.config import load_config
    from gspo.trainer.run import train

    results = []
    for overrides in cases:  # one process group for every case: the start-up is paid once
        config = load_config(None, overrides)
        if config.run_dir:
            train(config, config.run_dir)
            results.append(None)
        else:
            results.append(train_steps(overrides))
    if rank == 0:
        torch.save(results, out)


def spawn_runs(world: int, cases: list[list[str]], out) -> list[dict]:
    """Run ``cases`` one after the other in ``world`` gloo processes; rank 0's results (:func:`train_steps`;
    None for a case with a ``run_dir``: ``gspo train`` writes there)."""
    spawn(_runs_worker, world, cases, str(out))
    return torch.load(out, weights_only=True)


def spawn_run(world: int, overrides: list[str], out) -> None:
    """One case in ``world`` processes; rank 0's result saved to ``out``."""
    torch.save(spawn_runs(world, [overrides], str(out) + ".all")[0], out)


def single(overrides: list[str]):
    """(weights, per-step metrics) of the same run in this process."""
    result = train_steps(overrides)
    return result["params"], result["metrics"]
