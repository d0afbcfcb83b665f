"""Collect one rollout batch: prompts -> groups of completions -> rewards -> group advantages.

Paper section 3 / SPEC "The training step", steps 1-2. DAPO's dynamic sampling (drop groups whose
rewards are all equal, sample more until the batch is full) and overlong shaping live here too, as
calls to the pure functions in :mod:`gspo.algorithms`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gspo.algorithms import group_advantages, groups_with_signal, overlong_penalty
from gspo.evaluate import CORRECT_THRESHOLD
from gspo.moe import capture_routing
from gspo.rollout.base import Rollout, RolloutEngine, SamplingParams
from gspo.tasks.base import Row
from gspo.tasks.rewards import WeightedReward, score

# DAPO dynamic sampling gives up after this many extra rollout rounds per step and trains on the
# groups it has: a task where nearly every group is all-right or all-wrong would otherwise loop forever.
MAX_DYNAMIC_SAMPLING_ROUNDS = 4


@dataclass
class ScoredBatch:
    """A rollout batch with its rows, completions, rewards and advantages (B = groups x group_size)."""

    rollout: Rollout
    rows: list[Row]  # (B,) one row per response, repeated group_size times
    completions: list[str]  # (B,)
    rewards: torch.Tensor  # (B,) float32, weighted total
    advantages: torch.Tensor  # (B,) float32
    correct: torch.Tensor  # (B,) bool: the task's correctness reward (its first) is >= 0.5
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Collector:
    """Turns rows into a :class:`ScoredBatch` with one engine, one prompt renderer and the rewards."""

    engine: RolloutEngine
    render: Callable[[Row], list[int]]  # row -> prompt token ids
    decode: Callable[[list[int]], str]  # completion token ids (without padding) -> text
    rewards: list[WeightedReward]
    params: SamplingParams
    group_size: int
    advantage_scale: str = "group"
    overlong_buffer: int = 0
    none_policy: str = "zero"
    capture_routing: bool = False  # MoE: record the sampler's expert choices (Routing Replay R3)

    def collect(self, rows: list[Row], seed: int, first_index: int = 0) -> ScoredBatch:
        """Sample ``group_size`` completions per row and score them.

        ``first_index``: the global index of ``rows[0]`` in the step's batch; response j of prompt i is
        sampled with its own seed derived from (seed, first_index + i, j), whatever the batch split.
        """
        prompts = [ids for row in rows for ids in [self.render(row)] * self.group_size]
        row_seeds = [_row_seed(seed, first_index + i, j) for i in range(len(rows)) for j in range(self.group_size)]
        generator = torch.Generator().manual_seed(seed)
        if self.capture_routing:  # R3: the experts the rollout engine used, for every position
            with capture_routing(self.engine.model, concat="sequence") as routing:
                rollout = self.engine.generate(prompts, self.params, generator, row_seeds=row_seeds)
            rollout.routing = routing.pad_to(rollout.input_ids.shape[1])
        else:
            rollout = self.engine.generate(prompts, self.params, generator, row_seeds=row_seeds)
        t0 = time.perf_counter()
        group_rows = [row for row in rows for _ in range(self.group_size)]
        completions = [self.decode(ids[mask].tolist()) for ids, mask in
                       zip(rollout.completion_ids, rollout.completion_mask)]
        prompt_texts = [_prompt_text(row) for row in group_rows]
        totals, columns, metrics = score(self.rewards, prompt_texts, completions, group_rows,
                                         none_policy=self.none_policy)
        rewards = torch.tensor(totals, dtype=torch.float32)  # (B,)
        correct = torch.tensor(columns[self.rewards[0].name]) >= CORRECT_THRESHOLD  # (B,) by the task's first reward
        if self.overlong_buffer:
            penalty = overlong_penalty(rollout.lengths, self.params.max_new_tokens, self.overlong_buffer)
            rewards = rewards + penalty.float()
            metrics["reward/overlong_penalty"] = float(penalty.float().mean())
        advantages = group_advantages(rewards, self.group_size, scale=self.advantage_scale)  # (B,)
        metrics.update(rollout.timings)
        metrics["time/score_s"] = time.perf_counter() - t0
        return ScoredBatch(rollout, group_rows, completions, rewards, advantages, correct, metrics)

    def collect_with_signal(self, next_rows: Callable[[int], list[Row]], num_prompts: int, seed: int) -> ScoredBatch:
        """DAPO dynamic sampling: keep only groups with non-equal rewards, topping up from ``next_rows``."""
        kept: list[ScoredBatch] = []
        have = 0
        sampled_groups = 0
        for round_ in range(1 + MAX_DYNAMIC_SAMPLING_ROUNDS):
            batch = self.collect(next_rows(num_prompts), seed + 7919 * round_)
            sampled_groups += num_prompts
            signal = groups_with_signal(batch.rewards, self.group_size)  # (groups,)
            keep = signal.repeat_interleave(self.group_size).nonzero().squeeze(1)[: (num_prompts - have) * self.group_size]
            if len(keep):
                kept.append(_select(batch, keep))
                have += len(keep) // self.group_size
            if have >= num_prompts:
                break
        merged = _concat(kept) if kept else batch
        merged.advantages = group_advantages(merged.rewards, self.group_size, scale=self.advantage_scale)
        merged.metrics["dapo/kept_group_frac"] = have / max(sampled_groups, 1)
        merged.metrics["dapo/rounds"] = round_ + 1
        return merged


def _row_seed(seed: int, prompt_index: int, sample: int) -> int:
    """A per-response seed (a fixed mixing of the three numbers into 63 bits)."""
    return (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) % (1 << 63)


def _prompt_text(row: Row) -> str:
    prompt = row["prompt"]
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))


def _select(batch: ScoredBatch, index: torch.Tensor) -> ScoredBatch:
    idx = index.tolist()
    return ScoredBatch(
        rollout=batch.rollout.select(index),
        rows=[batch.rows[i] for i in idx],
        completions=[batch.completions[i] for i in idx],
        rewards=batch.rewards[index],
        advantages=batch.advantages[index],
        correct=batch.correct[index],
        metrics=dict(batch.metrics),
    )


def _concat(batches: list[ScoredBatch]) -> ScoredBatch:
    if len(batches) == 1:
        return batches[0]
    from gspo.rollout.base import concat_rollouts

    return ScoredBatch(
        rollout=concat_rollouts([b.rollout for b in batches]),
        rows=[r for b in batches for r in b.rows],
        completions=[c for b in batches for c in b.completions],
        rewards=torch.cat([b.rewards for b in batches]),
        advantages=torch.cat([b.advantages for b in batches]),
        correct=torch.cat([b.correct for b in batches]),
        metrics=dict(batches[0].metrics),
    )
