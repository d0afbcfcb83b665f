"""Collect one rollout batch: prompts -> groups of completions -> rewards -> group advantages.

Paper section 3 / docs/objectives.md, "The training step".  DAPO's dynamic sampling (drop groups whose
rewards are all equal, sample more until the batch is full) and overlong shaping live here too, as
calls to the pure functions in :mod:`gspo.algorithms`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gspo.algorithms import group_advantages, groups_with_signal, overlong_penalty
from gspo.algorithms.advantages import global_batch_std
from gspo.evaluate import CORRECT_THRESHOLD
from gspo.rollout.base import Rollout, RolloutEngine, SamplingParams
from gspo.rollout.base import row_seed as _row_seed  # the agent collector and the pipeline import it here
from gspo.tasks.base import Row, reward_prompt
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
    # (B,) the task's rewards before DAPO's overlong shaping: what dynamic sampling filters on (default: rewards)
    task_rewards: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.task_rewards is None:
            self.task_rewards = self.rewards

    def to(self, device: torch.device | str) -> "ScoredBatch":
        """The device boundary: this batch (rollout, routing, rewards, advantages) on ``device``.

        Collection and scoring build their tensors where it is cheap (rewards and bookkeeping on the CPU;
        vLLM and agent rollouts wholly on the CPU, the built-in engine's on the model's device); the
        trainer moves the scored batch to the policy's device once, here, as TRL's ``_prepare_inputs``
        and verl's ``DataProto.to(device)`` do. Code below the boundary takes the device from its inputs.
        """
        return ScoredBatch(self.rollout.to(device), self.rows, self.completions, self.rewards.to(device),
                           self.advantages.to(device), self.correct.to(device), dict(self.metrics))


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
    record_routing: bool = False  # MoE: record the sampler's expert choices (Routing Replay R3)
    # sums a tensor over the data-parallel processes (gspo.distributed.all_reduce_sum under torchrun): the
    # "batch" advantage scale is the std of the whole batch, not of one process's share
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    @property
    def max_response_tokens(self) -> int:
        """The most tokens of one response (the generation limit): Dr. GRPO's L."""
        return self.params.max_new_tokens

    def collect(self, rows: list[Row], seed: int, first_index: int = 0) -> ScoredBatch:
        """Sample ``group_size`` completions per row and score them.

        ``first_index``: the global index of ``rows[0]`` in the step's batch; response j of prompt i is
        sampled with its own seed derived from (seed, first_index + i, j), whatever the batch split.
        """
        prompts = [ids for row in rows for ids in [self.render(row)] * self.group_size]
        row_seeds = [_row_seed(seed, first_index + i, j) for i in range(len(rows)) for j in range(self.group_size)]
        generator = torch.Generator().manual_seed(seed)
        rollout = self.engine.generate(prompts, self.params, generator, row_seeds=row_seeds,
                                       record_routing=self.record_routing)  # R3: the engine's experts
        t0 = time.perf_counter()
        group_rows = [row for row in rows for _ in range(self.group_size)]
        completions = [self.decode(ids[mask].tolist()) for ids, mask in
                       zip(rollout.completion_ids, rollout.completion_mask)]
        prompt_texts = [reward_prompt(row) for row in group_rows]
        totals, columns, metrics = score(self.rewards, prompt_texts, completions, group_rows,
                                         none_policy=self.none_policy)
        rewards = torch.tensor(totals, dtype=torch.float32)  # (B,)
        correct = torch.tensor(columns[self.rewards[0].name]) >= CORRECT_THRESHOLD  # (B,) by the task's first reward
        task_rewards = rewards  # (B,) before the overlong shaping: DAPO's dynamic sampling filters on these
        if self.overlong_buffer:
            penalty = overlong_penalty(rollout.lengths.cpu(), self.params.max_new_tokens, self.overlong_buffer)
            rewards = rewards + penalty.float()
            metrics["reward/overlong_penalty"] = float(penalty.float().mean())
        # "batch" scale: the std of the whole batch, every process's rewards included
        batch_std = global_batch_std(rewards, self.sum_over_processes) if self.advantage_scale == "batch" else None
        advantages = group_advantages(rewards, self.group_size, scale=self.advantage_scale,
                                      batch_std=batch_std)  # (B,)
        metrics["reward/zero_std_frac"] = zero_variance_fraction(rewards, self.group_size)
        metrics.update(rollout.timings)
        metrics["time/score_s"] = time.perf_counter() - t0
        return ScoredBatch(rollout, group_rows, completions, rewards, advantages, correct, metrics, task_rewards)

    def collect_with_signal(self, next_shard: Callable[[], tuple[list[Row], int]], num_groups: int, seed: int, *,
                            gather: Callable[[ScoredBatch], list[ScoredBatch]] = lambda b: [b],
                            rank: int = 0, world_size: int = 1) -> ScoredBatch:
        """DAPO dynamic sampling: keep only groups whose task rewards are not all equal, topping up with more
        rollout rounds, and return this process's share of the ``num_groups`` kept groups.

        The filter reads the rewards before the overlong shaping (DAPO eq. 11 keeps a group when
        0 < #correct < G; verl's ``filter_groups.metric=acc``): with DAPO's single rule-based reward that is
        accuracy, and a group that differs only in its overlong penalties is dropped.

        Exact under data parallelism: every round each process samples its shard of the round's global
        prompts (``next_shard()`` -> (rows, global index of rows[0])), ``gather`` hands every process all
        shards in rank order, and the choice of groups is made on the global round, identically
        everywhere, so every process runs the same rounds, reads the stream equally and trains on
        ``num_groups / world_size`` groups: N processes select exactly the groups one process would.
        After ``MAX_DYNAMIC_SAMPLING_ROUNDS`` extra rounds the batch is filled up with the last round's
        zero-signal groups (advantage 0 but for any overlong penalty) so that its size never depends on luck
        or on the process count.
        """
        kept: list[ScoredBatch] = []
        have = sampled = 0
        for round_ in range(1 + MAX_DYNAMIC_SAMPLING_ROUNDS):
            rows, first_index = next_shard()
            local = self.collect(rows, seed + 7919 * round_, first_index=first_index)
            batch = _concat(gather(local))  # the whole round, in global prompt order
            sampled += len(batch.rewards) // self.group_size
            signal = groups_with_signal(batch.task_rewards, self.group_size)  # (groups,) before overlong shaping
            take = signal.nonzero().squeeze(1)[: num_groups - have]  # (k,) group indices
            if len(take):
                kept.append(_select_groups(batch, take, self.group_size))
                have += len(take)
            if have >= num_groups:
                break
        if have < num_groups:  # out of rounds: fill with the last round's zero-signal groups, in order
            kept.append(_select_groups(batch, (~signal).nonzero().squeeze(1)[: num_groups - have], self.group_size))
        merged = _concat(kept)
        merged.advantages = group_advantages(merged.rewards, self.group_size, scale=self.advantage_scale)
        share = num_groups // world_size
        mine = _select_groups(merged, torch.arange(rank * share, (rank + 1) * share), self.group_size)
        mine.metrics["dapo/kept_group_frac"] = have / max(sampled, 1)
        mine.metrics["dapo/rounds"] = round_ + 1
        return mine


def _select_groups(batch: ScoredBatch, groups: torch.Tensor, group_size: int) -> ScoredBatch:
    """The responses of ``groups`` ((k,) group indices), in that order."""
    rows = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)  # (k * G,)
    return _select(batch, rows)


def zero_variance_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: their advantages are 0, they carry no signal."""
    return float((~groups_with_signal(rewards, group_size)).float().mean())


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
        task_rewards=batch.task_rewards[index],
    )


def _concat(batches: list[ScoredBatch]) -> ScoredBatch:
    if len(batches) == 1:
        return batches[0]
    from gspo.rollout.base import concat_rollouts

    return ScoredBatch(
        rollout=concat_rollouts([b.rollout for b in batches]),  # padding is masked out: its id does not matter
        rows=[r for b in batches for r in b.rows],
        completions=[c for b in batches for c in b.completions],
        rewards=torch.cat([b.rewards for b in batches]),
        advantages=torch.cat([b.advantages for b in batches]),
        correct=torch.cat([b.correct for b in batches]),
        metrics=dict(batches[0].metrics),
        task_rewards=torch.cat([b.task_rewards for b in batches]),
    )
