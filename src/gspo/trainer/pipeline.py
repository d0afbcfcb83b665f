"""Pipelined sampling: the rollout of batch k+s is generated while the trainer updates on batch k.

With ``rollout.max_staleness = s > 0`` a sampler process (:class:`~gspo.rollout.subprocess.SubprocessEngine`)
holds its own copy of the policy and samples ahead of the update. Staleness is bounded and
deterministic: batch k is always sampled with the weights after update k-1-s (the initial weights for
the first s+1 batches), never "whatever was current", because the request for batch k+s is queued at
the start of step k, right behind the weights of version k (the weights after k updates), in one FIFO
queue. A seeded run is therefore bitwise reproducible, and resumable: a checkpoint holds the s batches
in flight (their rollouts and the weights version that sampled them), so a resumed run trains on
exactly the batches an uninterrupted one would have.

The objective stays exact: pi_old of a stale batch is the policy that sampled it, i.e. the sampler's
own log-probabilities (``loss.old_logprobs`` resolves to ``rollout``; a recomputation with the
trainer's current weights would compute the wrong policy, docs/objectives.md, "The training step"),
and the on-policy mismatch measurement is skipped for stale batches (their first minibatch is not
on-policy). ``max_staleness=0`` builds none of this: the synchronous loop is untouched.

Resource placement on a CPU (:func:`plan_placement`): the sampler and the trainer get disjoint cores
(a quarter of them, at least one, for the sampler: the update is about three quarters of a step of the
main job), pinned with ``os.sched_setaffinity`` where the OS has it, and each its own thread count.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gspo import distributed as dist
from gspo.errors import ConfigError
from gspo.rollout.base import Rollout
from gspo.rollout.subprocess import Placement, SubprocessEngine, place
from gspo.trainer.collect import Collector, ScoredBatch, _row_seed

# Share of the cores given to the sampler: the main job's update takes ~3/4 of a synchronous step
# (86.0 s of optimizer steps vs 28.7 s of sampling over 200 steps), so 1 of 4 cores.
SAMPLER_CORE_SHARE = 0.25


def plan_placement(num_params: int, cpu_threads: int = 0, cores: list[int] | None = None
                   ) -> tuple[Placement, Placement]:
    """(trainer, sampler) placement from the cores this process may use.

    Models under ``SINGLE_THREAD_MAX_PARAMS`` run one thread per process (as the synchronous loop
    does); larger ones one thread per core of their share. One core: both share it, unpinned.
    """
    from gspo.trainer.build import SINGLE_THREAD_MAX_PARAMS

    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    small = num_params < SINGLE_THREAD_MAX_PARAMS
    if len(cores) < 2:
        return Placement((), cpu_threads or 1), Placement((), 1)
    n_sampler = max(1, int(len(cores) * SAMPLER_CORE_SHARE))
    trainer, sampler = tuple(cores[:-n_sampler]), tuple(cores[-n_sampler:])
    return (Placement(trainer, cpu_threads or (1 if small else len(trainer))),
            Placement(sampler, 1 if small else len(sampler)))


@dataclass
class _Batch:
    """One requested rollout batch: its rows, seeds, the weights version that samples it."""

    step: int
    rows: list
    position: int  # the data cursor's position after taking these rows
    seed: int
    version: int  # number of updates behind the weights that sample it
    ticket: int | None = None
    rollout: Rollout | None = None
    sampler_s: float = 0.0


class Pipeline:
    """Keeps ``staleness`` rollout batches in flight in a sampler process (see the module docstring).

    ``collector`` scores each batch in the trainer process, exactly as the synchronous loop does (its
    engine is replaced by the finished rollout); ``steps`` bounds the requests (no batch beyond the run).
    """

    def __init__(self, engine: SubprocessEngine, collector: Collector, *, staleness: int, steps: int,
                 trainer_placement: Placement | None = None, shares_engine: bool = False) -> None:
        self.engine, self.collector = engine, collector
        self.staleness, self.steps = staleness, steps
        # the sampler is also the run's engine (vLLM: evaluation samples there too): the run's own weight
        # sync after every update (Components.sync_weights) already queues the weights, the last ones included
        self.shares_engine = shares_engine
        self.pending: deque[_Batch] = deque()
        self.next_step = 0  # the next batch to request
        self.version = 0  # updates done, i.e. the weights the trainer holds now
        self.consumed_position = 0
        self.started = False
        self.last: dict[str, float] = {}
        self._restore_placement = None
        if trainer_placement is not None and trainer_placement.cores:
            self._restore_placement = Placement(tuple(sorted(os.sched_getaffinity(0))), torch.get_num_threads())
            place(trainer_placement)

    # -- one step ------------------------------------------------------------------------------------
    def collect(self, step: int, *, model: torch.nn.Module, seed_of: Callable[[int], int],
                take_rows: Callable[[], list], position: Callable[[], int], restored: list | None = None
                ) -> ScoredBatch:
        """The scored batch of ``step``, after queueing the requests up to ``step + staleness``.

        The first call (a fresh run, or a resume at ``step``) pushes the trainer's weights as version
        ``step`` and takes the checkpointed in-flight batches (``restored``) instead of sampling them.
        """
        stored = {}
        if not self.started:
            self.started, self.version, self.next_step = True, step, step
            self.engine.sync_weights(model)
            stored = {entry["step"]: entry for entry in restored or []}
        while self.next_step <= min(step + self.staleness, self.steps - 1):
            self._request(self.next_step, seed_of(self.next_step), take_rows(), position(), stored.get(self.next_step))
            self.next_step += 1
        batch = self.pending.popleft()
        if batch.step != step:
            raise RuntimeError(f"pipeline out of order: batch {batch.step} at step {step}")
        start = time.perf_counter()
        self._finish(batch)
        wait = time.perf_counter() - start
        scored = dataclasses.replace(self.collector, engine=_Ready(batch.rollout)).collect(batch.rows, batch.seed)
        self.consumed_position = batch.position
        self.last = {"pipeline/staleness": float(step - batch.version), "pipeline/wait_s": wait,
                     "pipeline/sampler_busy_s": batch.sampler_s, "pipeline/in_flight": float(len(self.pending))}
        return scored

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """The weights after ``version`` updates: every later request samples with them."""
        self.version = version
        if self.next_step < self.steps and not self.shares_engine:  # else nothing left to sample, or already sent
            self.engine.sync_weights(model)

    def step_metrics(self, step_s: float) -> dict[str, float]:
        """The last batch's ``pipeline/*`` metrics; the trainer was busy for the step minus its wait."""
        return {**self.last, "pipeline/trainer_busy_s": step_s - self.last.get("pipeline/wait_s", 0.0)}

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_state(self) -> list[dict]:
        """The batches in flight, finished, as JSON (rollout tensors exact, with their weights version)."""
        out = []
        for batch in self.pending:
            self._finish(batch)
            out.append({"step": batch.step, "version": batch.version, "rollout": encode_rollout(batch.rollout)})
        return out

    def close(self) -> None:
        """Stop the sampler process and give the trainer back its cores. Idempotent."""
        self.engine.close()
        if self._restore_placement is not None:
            place(self._restore_placement)
            self._restore_placement = None

    # -- internals -----------------------------------------------------------------------------------
    def _request(self, step: int, seed: int, rows: list, position: int, stored: dict | None) -> None:
        c = self.collector
        batch = _Batch(step, rows, position, seed, version=self.version)
        if stored is not None:  # a resumed run: the batch its checkpoint had in flight
            batch.rollout, batch.version = decode_rollout(stored["rollout"]), int(stored["version"])
        else:
            prompts = [ids for row in rows for ids in [c.render(row)] * c.group_size]
            row_seeds = [_row_seed(seed, i, j) for i in range(len(rows)) for j in range(c.group_size)]
            batch.ticket = self.engine.submit(prompts, c.params, row_seeds, seed)
        self.pending.append(batch)

    def _finish(self, batch: _Batch) -> None:
        if batch.rollout is None:
            batch.rollout, batch.sampler_s = self.engine.result(batch.ticket)
        batch.rollout.policy_version = batch.version


@dataclass
class _Ready:
    """The collector's engine for one finished rollout: checks the request is the one that was sampled."""

    rollout: Rollout

    def generate(self, prompts, params, generator=None, *, row_seeds=None, record_routing=False) -> Rollout:
        r = self.rollout
        sampled = [ids[mask].tolist() for ids, mask in zip(r.prompt_ids, r.prompt_mask)]
        if sampled != prompts:
            raise RuntimeError("pipeline: the sampled prompts are not this step's (data order changed?)")
        return r


def check_pipeline(config, device: torch.device) -> None:
    """What the pipeline needs of the run's processes and device (before any sampler starts)."""
    s = config.rollout.max_staleness
    if dist.world_size() > 1:
        raise ConfigError(f"rollout.max_staleness={s} runs one sampler process beside one trainer; under torchrun "
                          "set rollout.max_staleness=0 (data-parallel pipelining is not implemented)")
    if device.type != "cpu":
        raise ConfigError(f"rollout.max_staleness={s} is implemented for the CPU (a sampler process on its own "
                          "cores); on a GPU set rollout.max_staleness=0")


def placements(model: torch.nn.Module, config) -> tuple[Placement, Placement]:
    """(trainer, sampler) placement of this run (:func:`plan_placement` from its size and cores)."""
    return plan_placement(sum(p.numel() for p in model.parameters()), config.cpu_threads)


def build_pipeline(parts, sampler: Callable[[Placement], SubprocessEngine]) -> Pipeline:
    """The pipeline of ``parts`` (``rollout.max_staleness > 0``): checks what only the built run can tell.

    ``sampler(placement)`` starts the sampler engine (the assembly point names it: a
    :class:`~gspo.rollout.subprocess.SubprocessEngine` running ``build_engine`` in its own process), or
    returns ``parts.engine`` when that already is one (vLLM: one engine serves sampling and evaluation).
    """
    config = parts.config
    s = config.rollout.max_staleness
    check_pipeline(config, parts.device)
    if parts.old_logprobs.plan.source != "rollout":
        raise ConfigError(f"rollout.max_staleness={s}: pi_old of a stale batch is the policy that sampled it, "
                          f"i.e. the sampler's log-probabilities, but this run recomputes them "
                          f"({parts.old_logprobs.plan.reason}); set loss.old_logprobs=rollout to train on "
                          f"them anyway, or rollout.max_staleness=0")
    trainer, placement = placements(parts.model, config)
    engine = sampler(placement)
    return Pipeline(engine, parts.collector, staleness=s, steps=config.steps, trainer_placement=trainer,
                    shares_engine=engine is parts.engine)


# -- rollouts as JSON (checkpointed in trainer_state.json, covered by the manifest's digest) ---------

_TENSORS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated",
            "completion_attention")


def encode_rollout(rollout: Rollout) -> dict:
    if rollout.routing is not None:
        raise ValueError("rollouts with MoE routing records are not checkpointed")
    out = {"timings": dict(rollout.timings), "policy_version": rollout.policy_version}
    for name in _TENSORS:
        t = getattr(rollout, name)
        out[name] = None if t is None else {"dtype": str(t.numpy().dtype), "shape": list(t.shape),
                                            "data": base64.b64encode(t.contiguous().numpy().tobytes()).decode()}
    return out


def decode_rollout(data: dict) -> Rollout:
    fields = {}
    for name in _TENSORS:
        item = data[name]
        fields[name] = None if item is None else torch.from_numpy(
            np.frombuffer(base64.b64decode(item["data"]), dtype=item["dtype"]).reshape(item["shape"]).copy())
    return Rollout(**fields, timings=dict(data["timings"]), policy_version=int(data["policy_version"]))
