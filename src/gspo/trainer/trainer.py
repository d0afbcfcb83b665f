"""The training loop, top-down: sample, score, advantages, update, log (SPEC "The training step").

The trainer orchestrates; the math lives in :mod:`gspo.algorithms`, sampling behind the
:class:`~gspo.rollout.base.RolloutEngine` interface, rewards with the task.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.checkpoint._fs import replace_file_atomic
from gspo.config.schema import Config
from gspo.errors import ConfigError
from gspo.evaluate import Evaluator
from gspo.logprobs import token_logprobs
from gspo.moe import SUPPORTED_ARCHITECTURES, capture_routing, supports_routing
from gspo.rollout.base import SamplingParams
from gspo.tasks.base import DataCursor
from gspo.tasks.registry import build_task
from gspo.tasks.render import PromptRenderer
from gspo.tasks.rewards import resolve_rewards
from gspo.rollout.hf import HFEngine
from gspo.trainer.build import (DTYPES, build_optimizer, build_parts, build_scheduler, frozen_copy, reference_policy,
                                resolve_old_logprobs)
from gspo.trainer.collect import Collector, ScoredBatch
from gspo.trainer.logging import MetricsLogger
from gspo.trainer.policy import PolicyLogprobs
from gspo.trainer.update import Updater, UpdateInputs


@dataclass
class TrainState:
    """What a checkpoint must hold besides weights and optimizer: the step and the data position."""

    step: int = 0
    data_position: int = 0
    history: dict = field(default_factory=dict)  # e.g. the evaluation before training
    skipped_steps: int = 0  # optimizer steps skipped so far for a non-finite loss or gradient


class Trainer:
    def __init__(self, config: Config, run_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir) if run_dir else None
        self.parts = build_parts(config)
        self.model = self.parts.model  # the Hugging Face model (unwrapped)
        self.sharded = dist.is_initialized() and config.distributed.strategy == "fsdp"
        if self.sharded:  # the sampler needs whole weights: it gets its own copy, refreshed every step
            self.parts.engine = HFEngine(copy.deepcopy(self.model), pad_token_id=self.parts.engine.pad_token_id,
                                         eos_token_id=self.parts.engine.eos_ids.tolist(),
                                         decoder=config.rollout.decoder)
        self.policy = dist.wrap_for_training(PolicyLogprobs(self.model), config.distributed.strategy)
        if self.sharded:  # fully_shard replaced the parameters: the optimizer must see the sharded ones
            self.parts.optimizer = build_optimizer(self.policy, config)
            self.parts.scheduler = build_scheduler(self.parts.optimizer, config,
                                                   config.steps * config.optim.minibatches * config.optim.epochs)
        tok = self.parts.tokenizer
        r = config.rollout
        self.task = build_task(config.data, seed=config.seed, eval_size=config.eval.size)
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.render = PromptRenderer(tok, config.data.system_prompt, config.data.chat_template,
                                     max_prompt_tokens=(context - r.max_new_tokens) if context else None)
        self.rewards = resolve_rewards(config.reward.functions, self.task.rewards, device=self.parts.device)
        self.params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_p=r.top_p, top_k=r.top_k, ignore_eos=r.ignore_eos)
        self.moe = supports_routing(self.model)
        self.old_logprobs_source = resolve_old_logprobs(config, self.model, self.parts.engine, self.moe)
        replay = config.moe.routing_replay
        if replay != "off" and not self.moe:
            raise ConfigError(f"moe.routing_replay={replay} needs a Mixture-of-Experts model ({', '.join(SUPPORTED_ARCHITECTURES)}); "
                              f"'{config.model}' is dense: set moe.routing_replay=off")
        self.collector = Collector(self.parts.engine, self.render, self.render.decode, self.rewards, self.params,
                                   r.group_size, config.loss.advantage_scale, config.loss.overlong_buffer,
                                   config.reward.none_policy, capture_routing=replay == "r3")
        self.evaluator = Evaluator(self.parts.engine, self.render, self.render.decode, self.rewards, r.max_new_tokens)
        low, high = config.clip_range
        o = config.optim
        self.updater = Updater(config.algorithm, low, high, beta=config.loss.beta,
                               kl_estimator=config.loss.kl_estimator, temperature=r.temperature,
                               minibatches=o.minibatches, epochs=o.epochs, micro_batch_size=o.micro_batch_size,
                               max_grad_norm=o.max_grad_norm,
                               autocast_dtype=DTYPES[o.dtype] if o.dtype != "float32" else None,
                               routing_replay=replay != "off")
        self.state = TrainState()
        self.last_updates: list[dict] = []
        self.data = DataCursor(self.task.train_stream)
        self.logger = MetricsLogger(self.run_dir, tensorboard=config.log.tensorboard, enabled=dist.is_main(),
                                    trackers=config.log.trackers, project=config.log.project,
                                    run_config=config.to_dict())

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One rollout batch and its ``minibatches`` optimizer steps; returns the step's metrics."""
        cfg, step = self.config, self.state.step
        t0 = time.perf_counter()
        seed = _step_seed(cfg.seed, step, dist.rank())
        if cfg.dynamic_sampling:
            batch = self.collector.collect_with_signal(self._take_shard, self._shard_size(), seed)
        else:  # per-response seeds from the step and the prompt's global index: independent of the split
            batch = self.collector.collect(self._take_shard(), _step_seed(cfg.seed, step, rank=0),
                                           first_index=dist.rank() * self._shard_size())
        t1 = time.perf_counter()
        local = len(batch.advantages)
        if cfg.dynamic_sampling:  # shard sizes differ per process: permute locally
            plan = self.updater.plan(torch.Generator().manual_seed(seed + 1), local)
        else:  # one permutation of the global batch, the same on every process
            shared = torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank=0) + 1)
            plan = self.updater.plan(shared, local, offset=dist.rank() * local, total=local * dist.world_size())
        inputs, lp_metrics = self._update_inputs(batch, onpolicy=plan[0] == 0)
        t2 = time.perf_counter()
        history = self.updater.update(self.policy, self.parts.optimizer, self.parts.scheduler, inputs, plan=plan)
        if inputs.measure_old is not None:  # old log-probs from the sampler: its mismatch, from the on-policy forward
            lp_metrics.update(_onpolicy_mismatch(self.updater.onpolicy_pairs))
        self.sync_engine()
        self.last_updates = history  # per-optimizer-step metrics, for inspection and tests
        t3 = time.perf_counter()
        self.state.step += 1
        self.state.data_position = self.data.position
        self.state.skipped_steps += int(sum(h["optim/skipped"] for h in history))
        self._maybe_refresh_reference()
        metrics = {**batch.metrics, **lp_metrics, **_summarise_updates(history), **_batch_metrics(batch)}
        metrics = dist.mean_over_processes(metrics)
        metrics["optim/skipped_total"] = self.state.skipped_steps
        tokens = int(batch.rollout.lengths.sum())  # generated by this process
        trained = tokens + int(batch.rollout.prompt_mask.sum())  # real tokens in each log-probability pass
        sampling = metrics.get("sample/prefill_s", 0.0) + metrics.get("sample/decode_s", 0.0)
        metrics.update({"time/rollout_s": t1 - t0, "time/logprobs_s": t2 - t1, "time/update_s": t3 - t2,
                        "time/step_s": t3 - t0, "tokens/generated": tokens, "tokens/trained": trained,
                        # end to end (sample, score, log-probabilities, update): what the progress bar shows
                        "throughput/tokens_per_s": tokens / max(t3 - t0, 1e-9),
                        "throughput/sample_tokens_per_s": tokens / max(sampling or t1 - t0, 1e-9),
                        "throughput/train_tokens_per_s": trained / max(t3 - t1, 1e-9)})
        self.logger.log(self.state.step, metrics)
        self.logger.samples(self.state.step, _sample_rows(batch, cfg.log.samples))
        return metrics

    def sync_engine(self) -> None:
        """Make the sampler use the weights just trained (gathers shards under FSDP2: every process)."""
        if self.sharded:
            dist.copy_full_weights(self.model, self.parts.engine.model)
        else:
            self.parts.engine.sync_weights(self.model)

    def _shard_size(self) -> int:
        """Prompts this process samples per step (validated to divide evenly)."""
        return self.config.rollout.prompts_per_step // dist.world_size()

    def _take_shard(self, num_prompts: int | None = None) -> list:
        """This process's share of the next global batch of prompts: every process reads the same
        stream and keeps its own slice, so groups never straddle processes."""
        n = num_prompts or self._shard_size()
        rows = self.data.take(n * dist.world_size())
        return rows[dist.rank() * n : (dist.rank() + 1) * n]

    @torch.no_grad()
    def _update_inputs(self, batch: ScoredBatch, onpolicy: torch.Tensor | None = None
                       ) -> tuple[UpdateInputs, dict[str, float]]:
        """Old (and reference) log-probabilities for the batch, recomputed in one no-grad pass each.

        ``onpolicy``: (B,) bool, the rows of the first minibatch. The first optimizer step's forward runs
        on them with the weights that sampled them, so their old log-probabilities are that forward's,
        detached (:attr:`UpdateInputs.reuse_old`): the no-grad pass skips them, a quarter of its work with
        4 minibatches. Dense models only (MoE passes record or replay the experts of every row).
        Both passes run in the training forward's precision (bfloat16 autocast with ``optim.dtype=bfloat16``).
        """
        replay = self.config.moe.routing_replay
        # R2 replay, or volatility diagnostics: the experts of the training model's own old-policy pass.
        capture = self.moe and (replay == "r2" or (replay == "off" and self.config.moe.diagnostics))
        with self.updater.autocast(batch.rollout.prompt_ids.device.type):
            return self._old_and_reference(batch, onpolicy, capture)

    def _old_and_reference(self, batch: ScoredBatch, onpolicy: torch.Tensor | None, capture: bool
                           ) -> tuple[UpdateInputs, dict[str, float]]:
        rollout, temp = batch.rollout, self.config.rollout.temperature
        ids, attn, num_t = rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
        mask = rollout.completion_mask
        metrics: dict[str, float] = {}
        replay = self.config.moe.routing_replay
        recompute = self.old_logprobs_source == "recompute"
        routing, reuse = None, None
        if recompute and not self.moe and onpolicy is not None and not bool(onpolicy.all()):
            reuse = onpolicy.clone()  # (B,) every process still runs the pass below on at least one row
        if reuse is not None:
            keep = (~reuse).nonzero().squeeze(1)  # (b,)
            part = self._no_grad_logprobs(ids[keep], attn[keep], num_t, len(mask))  # (b, T)
            old = part.new_zeros(mask.shape)  # (B, T) the on-policy rows are filled in by the first update step
            old[keep] = part
            metrics.update(_mismatch_metrics(old[keep], rollout.logprobs[keep], mask[keep]))
        elif recompute or capture:
            with capture_routing(self.model) if capture else contextlib.nullcontext() as routing:
                old = self.policy(ids, attn, num_t, temp)  # (B, T)
            metrics.update(_mismatch_metrics(old, rollout.logprobs, mask))
        measure = None
        if not recompute:
            old = rollout.logprobs
            if not self.moe and onpolicy is not None:
                measure = onpolicy.clone()  # (B,) the first update's forward compares trainer and sampler
        if replay == "r3":
            routing = rollout.routing
        ref = None
        if self.parts.reference is not None:
            with reference_policy(self.parts) as reference:  # LoRA: the base model, adapter disabled
                ref = token_logprobs(reference, ids, attn, num_t, temperature=temp)  # (B, T)
        return UpdateInputs(ids, attn, mask, batch.advantages, old, ref, routing, reuse, measure), metrics

    def _no_grad_logprobs(self, ids: torch.Tensor, attn: torch.Tensor, num_t: int, batch_size: int) -> torch.Tensor:
        """(b, T) log-probabilities in chunks of a training forward's rows (a minibatch, or a micro-batch),
        so that this pass never holds more activations than a training step (which may checkpoint them).

        One process only: under DDP / FSDP2 every forward is a collective and the chunk counts could
        differ between processes, so those run one pass.
        """
        o, temp = self.config.optim, self.config.rollout.temperature
        size = o.micro_batch_size or -(-batch_size // o.minibatches)
        if dist.world_size() > 1 or len(ids) <= size:
            return self.policy(ids, attn, num_t, temp)
        return torch.cat([self.policy(i, a, num_t, temp) for i, a in zip(ids.split(size), attn.split(size))])

    def _maybe_refresh_reference(self) -> None:
        every = self.config.loss.ref_refresh_steps
        if self.parts.reference is not None and every and self.state.step % every == 0:
            self.parts.reference = frozen_copy(self.model)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy sampled at the training temperature, and greedy accuracy."""
        rows = self.task.eval_rows
        sampled = self.evaluator.evaluate(rows, temperature=self.config.rollout.temperature,
                                          samples=self.config.eval.samples, seed=self.config.seed)
        out = {"eval/accuracy": sampled.get("accuracy", 0.0), "eval/reward": sampled.get("reward", 0.0)}
        if self.config.eval.greedy:
            greedy = self.evaluator.evaluate(rows, temperature=0.0)
            out["eval/greedy_accuracy"] = greedy.get("accuracy", 0.0)
        return out

    def save_resolved_config(self) -> None:
        if self.run_dir is not None and dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # atomic: a kill mid-write must not leave a truncated config.json that blocks --resume
            replace_file_atomic(self.run_dir / "config.json", json.dumps(self.config.to_dict(), indent=2).encode())


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def _mismatch_metrics(recomputed: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the sampler's log-probabilities are from the trainer's (paper section 5.4)."""
    diff = torch.where(mask, recomputed - sampler, torch.zeros_like(recomputed))  # (B, T)
    lengths = mask.sum(1).clamp_min(1)
    seq = diff.sum(1) / lengths  # (B,) sequence log-ratio of trainer vs sampler
    tokens = diff[mask]
    return {"mismatch/token_abs_mean": float(tokens.abs().mean()) if tokens.numel() else 0.0,
            "mismatch/token_std": float(tokens.std()) if tokens.numel() > 1 else 0.0,
            "mismatch/seq_std": float(seq.std()) if seq.numel() > 1 else 0.0}


def _onpolicy_mismatch(pairs: list) -> dict[str, float]:
    """:func:`_mismatch_metrics` over the on-policy rows the update measured (all keys, even if none)."""
    if not pairs:
        return _mismatch_metrics(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool))
    return _mismatch_metrics(*(torch.cat(parts) for parts in zip(*pairs)))


def _summarise_updates(history: list[dict]) -> dict[str, float]:
    """Means over the step's optimizer steps, plus the first (on-policy) minibatch's clip fraction."""
    keys = {k for h in history for k in h if k != "minibatch"}
    out = {k: sum(h.get(k, 0.0) for h in history) / len(history) for k in keys}
    if "loss/clip_frac" in history[0]:
        out["onpolicy/clip_frac"] = history[0]["loss/clip_frac"]
    return out


def _batch_metrics(batch: ScoredBatch) -> dict[str, float]:
    rewards, lengths = batch.rewards, batch.rollout.lengths.float()
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "reward/accuracy": float(batch.correct.float().mean()),
            "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(batch.rollout.truncated.float().mean())}


def _sample_rows(batch: ScoredBatch, n: int) -> list[dict]:
    return [{"prompt": str(batch.rows[i]["prompt"]), "completion": batch.completions[i],
             "reward": float(batch.rewards[i]), "advantage": float(batch.advantages[i])}
            for i in range(min(n, len(batch.completions)))]
