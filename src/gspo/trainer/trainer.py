"""The training loop, top-down: sample, score, advantages, old log-probabilities, update, log.

The trainer only runs steps: :func:`gspo.trainer.build.build` assembles everything once; the math lives
in :mod:`gspo.algorithms`, sampling behind the :class:`~gspo.rollout.base.RolloutEngine` interface,
rewards with the task, the choice of pi_old in :mod:`gspo.trainer.old_logprobs`
(docs/objectives.md, "The training step").
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.checkpoint._fs import replace_file_atomic
from gspo.config.schema import Config
from gspo.cuda_settings import release_cached_memory
from gspo.host_memory import release_freed_memory
from gspo.tasks.base import DataCursor
from gspo.trainer.build import Components, build
from gspo.trainer.collect import ScoredBatch
from gspo.trainer.old_logprobs import onpolicy_mismatch
from gspo.trainer.update import policy_device


@dataclass
class TrainState:
    """What a checkpoint must hold besides weights and optimizer: the step and the data position."""

    step: int = 0
    data_position: int = 0
    history: dict = field(default_factory=dict)  # e.g. the evaluation before training
    skipped_steps: int = 0  # optimizer steps skipped so far for a non-finite loss or gradient
    # rollout.max_staleness > 0: the batches in flight at the checkpoint, with their weights version (trainer/pipeline.py)
    in_flight: list = field(default_factory=list)
    # loss.ref_refresh_steps > 0: the step whose weights the KL reference holds (0: the initial model)
    reference_step: int = 0


class Trainer:
    """Runs training steps and evaluations with the :class:`Components` that :func:`build` made.

    ``Trainer.from_config(config, run_dir)`` builds and wraps in one call. Attributes are the components'
    (``model``, ``task``, ``collector``, ``updater``, ``logger``, ...) plus the run's :class:`TrainState`.
    """

    def __init__(self, parts: Components) -> None:
        self.parts = parts
        self.config = parts.config
        self.run_dir = parts.run_dir
        self.model = parts.model  # the Hugging Face model (unwrapped)
        self.policy = parts.policy
        self.task, self.render, self.rewards = parts.task, parts.render, parts.rewards
        self.collector, self.evaluator, self.updater = parts.collector, parts.evaluator, parts.updater
        self.logger = parts.logger
        self.pipeline = parts.pipeline  # None unless rollout.max_staleness > 0 (trainer/pipeline.py)
        self.state = TrainState()
        self.last_updates: list[dict] = []
        self.data = DataCursor(self.task.train_stream)
        self.zero_signal = ZeroSignalWatch()
        self.notes: list[str] = []  # messages for the user (e.g. "no learning signal"), taken by the run loop

    @classmethod
    def from_config(cls, config: Config, run_dir: Path | None = None, **replace) -> "Trainer":
        """Build the run described by ``config`` (keyword arguments as in :func:`build`) and wrap it."""
        return cls(build(config, run_dir, **replace))

    @property
    def old_logprobs_plan(self):
        return self.parts.old_logprobs.plan

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One rollout batch and its ``minibatches`` optimizer steps; returns the step's metrics."""
        cfg, step = self.config, self.state.step
        t0 = time.perf_counter()
        seed = _step_seed(cfg.seed, step, rank=0)  # per-response seeds: independent of the batch split
        batch = self._collect(seed).to(policy_device(self.policy))  # the device boundary: once, after scoring
        release_cached_memory(policy_device(self.policy))  # CUDA: the sampler's blocks back before the update
        release_freed_memory()  # the host heap's free memory back to the OS (gspo.host_memory)
        t1 = time.perf_counter()
        local = len(batch.advantages)  # equal on every process (validated shard sizes)
        shared = torch.Generator().manual_seed(seed + 1)  # one split of the global batch, everywhere
        plan = self.updater.plan(shared, local, offset=dist.rank() * local, total=local * dist.world_size())
        fresh = batch.rollout.policy_version in (-1, step)  # a stale batch has no on-policy minibatch
        onpolicy = plan[0][0].rows(local) if fresh else None  # (B,) bool
        with self.updater.autocast(policy_device(self.policy).type):  # the policy's device, not the batch's
            inputs, lp_metrics = self.parts.old_logprobs(batch, onpolicy=onpolicy, minibatches=plan[0])
        release_freed_memory()
        t2 = time.perf_counter()
        history = self.updater.update(self.policy, self.parts.optimizer, self.parts.scheduler, inputs, plan=plan)
        if inputs.measure_old is not None:  # old log-probs from the sampler: its mismatch, from the on-policy forward
            lp_metrics.update(onpolicy_mismatch(self.updater.onpolicy_pairs))
        self.parts.sync_weights()
        if self.pipeline is not None:  # the weights after step + 1 updates, queued behind the requests so far
            self.pipeline.push_weights(self.model, step + 1)
        self.last_updates = history  # per-optimizer-step metrics, for inspection and tests
        t3 = time.perf_counter()
        self.state.step += 1
        self.state.data_position = self.pipeline.consumed_position if self.pipeline else self.data.position
        self.state.skipped_steps += int(sum(h["optim/skipped"] for h in history))
        self._maybe_refresh_reference()
        # over every process: the update's metrics are the global minibatches' already, the batch's are
        # computed on the gathered batch, the rest are means over equal shares
        metrics = {**dist.mean_over_processes({**batch.metrics, **lp_metrics}), **_summarise_updates(history),
                   **_batch_metrics(batch)}
        metrics["optim/skipped_total"] = self.state.skipped_steps
        tokens = int(batch.rollout.lengths.sum())  # generated by this process
        trained = tokens + int(batch.rollout.prompt_mask.sum())  # real tokens in each log-probability pass
        sampling = sum(metrics.get(k, 0.0) for k in ("sample/prefill_s", "sample/decode_s", "sample/generate_s"))
        metrics.update({"time/rollout_s": t1 - t0, "time/logprobs_s": t2 - t1, "time/update_s": t3 - t2,
                        "time/step_s": t3 - t0, "tokens/generated": tokens, "tokens/trained": trained,
                        # end to end (sample, score, log-probabilities, update): what the progress bar shows
                        "throughput/tokens_per_s": tokens / max(t3 - t0, 1e-9),
                        "throughput/sample_tokens_per_s": tokens / max(sampling or t1 - t0, 1e-9),
                        "throughput/train_tokens_per_s": trained / max(t3 - t1, 1e-9)})
        if self.pipeline is not None:
            metrics.update(self.pipeline.step_metrics(t3 - t0))
        warning = self.zero_signal.observe(metrics.get("reward/zero_std_frac", 0.0), metrics.get("reward/mean"))
        if warning:
            self.notes.append(warning)
        self.logger.log(self.state.step, metrics)
        self.logger.samples(self.state.step, _sample_rows(batch, cfg.log.samples))
        return metrics

    def _collect(self, seed: int) -> ScoredBatch:
        """This process's share of the step's scored rollout batch."""
        shard = self._shard_size()
        if self.pipeline is not None:  # sampled ahead by the sampler process (trainer/pipeline.py)
            return self.pipeline.collect(self.state.step, model=self.model, take_rows=self._take_shard,
                                         seed_of=lambda step: _step_seed(self.config.seed, step, rank=0),
                                         position=lambda: self.data.position, restored=self.state.in_flight)
        if not self.config.dynamic_sampling:
            return self.collector.collect(self._take_shard(), seed, first_index=dist.rank() * shard)
        return self.collector.collect_with_signal(
            lambda: (self._take_shard(), dist.rank() * shard), self.config.rollout.prompts_per_step, seed,
            gather=_gather_round, rank=dist.rank(), world_size=dist.world_size())

    def close(self) -> None:
        """Stop what the run started besides this process (the pipeline's sampler process). Idempotent."""
        if self.pipeline is not None:
            self.pipeline.close()

    def sync_engine(self) -> None:
        """Make the sampler use the weights just trained (every process: FSDP2 gathers shards)."""
        self.parts.sync_weights()

    def _shard_size(self) -> int:
        """Prompts this process samples per step (validated to divide evenly)."""
        return self.config.rollout.prompts_per_step // dist.world_size()

    def _take_shard(self, num_prompts: int | None = None) -> list:
        """This process's share of the next global batch of prompts: every process reads the same
        stream and keeps its own slice, so groups never straddle processes."""
        n = num_prompts or self._shard_size()
        rows = self.data.take(n * dist.world_size())
        return rows[dist.rank() * n : (dist.rank() + 1) * n]

    def _maybe_refresh_reference(self) -> None:
        every = self.config.loss.ref_refresh_steps
        if self.parts.reference is not None and every and self.state.step % every == 0:
            self.parts.refresh_reference()
            self.state.reference_step = self.state.step

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy sampled at the training temperature, and greedy accuracy."""
        return evaluate_heldout(self.evaluator, self.task.eval_rows, self.config)

    def save_resolved_config(self) -> None:
        """``config.json``: the run's config with every algorithm-dependent default resolved."""
        if self.run_dir is not None and dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # atomic: a kill mid-write must not leave a truncated config.json that blocks --resume
            replace_file_atomic(self.run_dir / "config.json", json.dumps(self.config.resolved_dict(), indent=2).encode())
            # what optim.dtype / rollout.engine_dtype=auto resolved to on this machine, and why (gspo.precision)
            replace_file_atomic(self.run_dir / "precision.json",
                                json.dumps(asdict(self.parts.precision), indent=2).encode())


def evaluate_heldout(evaluator, rows: list, config: Config) -> dict[str, float]:
    """``eval/accuracy`` sampled at the training temperature (``eval.samples`` per prompt), ``eval/reward``
    and, with ``eval.greedy``, ``eval/greedy_accuracy``."""
    sampled = evaluator.evaluate(rows, temperature=config.rollout.temperature, samples=config.eval.samples,
                                 seed=config.seed)
    out = {"eval/accuracy": sampled.get("accuracy", 0.0), "eval/reward": sampled.get("reward", 0.0)}
    if config.eval.greedy:
        greedy = evaluator.evaluate(rows, temperature=0.0)
        out["eval/greedy_accuracy"] = greedy.get("accuracy", 0.0)
    return out


# A run "has no learning signal" when at least this share of its groups had all-equal rewards (zero
# advantage everywhere) for ZERO_SIGNAL_STEPS steps in a row: the gradient is then (nearly) zero.
ZERO_SIGNAL_FRACTION = 0.9
ZERO_SIGNAL_STEPS = 5
NO_SIGNAL_HINT = ("check the prompt format (does the model see what it was trained on: BOS, chat template, "
                  "data.system_prompt?), the reward function (does it ever return different values for one "
                  "prompt?) and data.answer_column (is the reference answer the one rewards compare with?)")


@dataclass
class ZeroSignalWatch:
    """Counts consecutive steps in which nearly every group had zero reward variance; warns once."""

    streak: int = 0
    warned: bool = False
    zero_streak: int = 0  # steps in a row whose every reward was exactly 0

    def observe(self, zero_std_frac: float, reward_mean: float | None = None) -> str | None:
        """The warning text when the streak first reaches ZERO_SIGNAL_STEPS, else None."""
        self.streak = self.streak + 1 if zero_std_frac >= ZERO_SIGNAL_FRACTION else 0
        self.zero_streak = self.zero_streak + 1 if reward_mean == 0.0 and zero_std_frac == 1.0 else 0
        if self.streak >= ZERO_SIGNAL_STEPS and not self.warned:
            self.warned = True
            if self.zero_streak >= self.streak:  # the plainest case, named as such
                return (f"warning: no learning signal: every reward was exactly 0 for {self.streak} steps in a row "
                        "(no completion scored: zero advantage, zero gradient); " + NO_SIGNAL_HINT)
            return (f"warning: no learning signal: {zero_std_frac:.0%} of groups had identical rewards for "
                    f"{self.streak} steps in a row (zero advantage, zero gradient); " + NO_SIGNAL_HINT)
        return None


def _gather_round(share: ScoredBatch) -> list[ScoredBatch]:
    """Every process's share of a DAPO dynamic-sampling round, in rank order, each carrying the whole
    round's metrics (the mean over the equal shares, as one process would report them)."""
    shares = dist.all_gather_object(share)
    keys = set().union(*(s.metrics for s in shares))
    metrics = {k: sum(s.metrics.get(k, 0.0) for s in shares) / len(shares) for k in keys}
    for s in shares:
        s.metrics = dict(metrics)
    return shares


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def _summarise_updates(history: list[dict]) -> dict[str, float]:
    """Means over the step's optimizer steps, plus the first (on-policy) minibatch's clip fraction."""
    keys = {k for h in history for k in h if k != "minibatch"}
    out = {k: sum(h.get(k, 0.0) for h in history) / len(history) for k in keys}
    if "loss/clip_frac" in history[0]:
        out["onpolicy/clip_frac"] = history[0]["loss/clip_frac"]
    return out


def _batch_metrics(batch: ScoredBatch) -> dict[str, float]:
    """Reward and length statistics of the step's whole batch (every process's responses)."""
    columns = torch.stack([batch.rewards.double().cpu(), batch.correct.double().cpu(),
                           batch.rollout.lengths.double().cpu(), batch.rollout.truncated.double().cpu()])  # (4, B)
    rewards, correct, lengths, truncated = dist.concat_over_processes(columns, dim=1)  # (4, B * processes)
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "reward/accuracy": float(correct.mean()),
            "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(truncated.mean())}


def _sample_rows(batch: ScoredBatch, n: int) -> list[dict]:
    # agents: per-turn advantages are (B, T); a sample line shows its first token's (turn 1)
    return [{"prompt": str(batch.rows[i]["prompt"]), "completion": batch.completions[i],
             "reward": float(batch.rewards[i]), "advantage": float(batch.advantages[i].reshape(-1)[0])}
            for i in range(min(n, len(batch.completions)))]
