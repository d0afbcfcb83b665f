"""Episodes -> a :class:`~gspo.trainer.collect.ScoredBatch`, the same object single-turn collection makes.

:class:`EpisodeCollector` is what :func:`gspo.trainer.build.build` uses for a task with an
environment: rows -> groups of episodes (:class:`~gspo.agents.episode.EpisodeRunner`) -> rewards
(the task's reward functions on each episode's answer, plus per-turn rewards) -> group advantages
(eq. 6 of the GSPO paper, on the episode reward), or per-turn advantages (:func:`turn_advantages`: eq. 6
per turn, on the returns-to-go) for the objectives that take (B, T) advantages. The objectives then see
one sequence per episode whose ``completion_mask`` covers the model's tokens only, so GSPO's sequence
ratio and its 1/|y| length normalisation run over the model's tokens of every turn, and nothing else.

:class:`EpisodeEvaluator` is the held-out counterpart of :class:`gspo.evaluate.Evaluator`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gspo.agents.episode import Episode, EpisodeRunner, assemble, turn_index
from gspo.algorithms import group_advantages
from gspo.algorithms.advantages import global_batch_std, turn_group_advantages
from gspo.errors import ConfigError
from gspo.evaluate import CORRECT_THRESHOLD, pass_at_k
from gspo.rollout.base import SamplingParams
from gspo.tasks.base import Row, reward_prompt
from gspo.tasks.rewards import WeightedReward, score
from gspo.trainer.collect import ScoredBatch, _row_seed, zero_variance_fraction

ADVANTAGES = ("episode", "turn")


@dataclass
class EpisodeCollector:
    """Turns rows into a :class:`ScoredBatch` of multi-turn episodes (same ``collect`` as ``Collector``)."""

    runner: EpisodeRunner
    render: Callable[[Row], list[int]]
    rewards: list[WeightedReward]
    params: SamplingParams
    group_size: int
    advantage_scale: str = "group"
    none_policy: str = "zero"
    advantages: str = "episode"  # "turn": (B, T) per-turn advantages (token-level objectives only)
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # as Collector's ("batch" scale)

    @property
    def max_response_tokens(self) -> int:
        """The most model tokens of one episode (every turn's budget, within the context): Dr. GRPO's L."""
        return self.runner.max_model_tokens(self.params.max_new_tokens)

    def collect(self, rows: list[Row], seed: int, first_index: int = 0) -> ScoredBatch:
        """``group_size`` episodes per row; episode j of prompt i is seeded from (seed, first_index + i, j)."""
        group_rows = [row for row in rows for _ in range(self.group_size)]
        prompts = [self.render(row) for row in group_rows]
        row_seeds = [_row_seed(seed, first_index + i, j) for i in range(len(rows)) for j in range(self.group_size)]
        episodes, timings = self.runner.run(prompts, group_rows, self.params, row_seeds, seed=seed)
        t0 = time.perf_counter()
        rollout = assemble(episodes, self.runner.pad_token_id)
        rollout.timings = timings
        rewards, correct, metrics = score_episodes(self.runner, episodes, group_rows, self.rewards, self.none_policy)
        # "batch" scale: the std of the whole batch, every process's rewards included
        batch_std = global_batch_std(rewards, self.sum_over_processes) if self.advantage_scale == "batch" else None
        advantages = group_advantages(rewards, self.group_size, scale=self.advantage_scale,
                                      batch_std=batch_std)  # (B,)
        if self.advantages == "turn":
            advantages = turn_advantages(rewards, episodes, self.group_size, self.advantage_scale,
                                         width=rollout.completion_ids.shape[1], batch_std=batch_std)  # (B, T)
        metrics["reward/zero_std_frac"] = zero_variance_fraction(rewards, self.group_size)
        metrics.update(timings)
        metrics["time/score_s"] = time.perf_counter() - t0
        transcripts = [self.runner.decode(e.ids) for e in episodes]
        return ScoredBatch(rollout, group_rows, transcripts, rewards, advantages, correct, metrics)

    def collect_with_signal(self, *args, **kwargs) -> ScoredBatch:
        raise ConfigError("dynamic sampling (loss.dynamic_sampling, DAPO's default) is not supported with agent "
                          "tasks yet; set loss.dynamic_sampling=false")


def score_episodes(runner: EpisodeRunner, episodes: list[Episode], rows: list[Row],
                   rewards: Sequence[WeightedReward], none_policy: str
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(B,) rewards (task rewards on each answer + per-turn rewards), (B,) correct, and metrics."""
    answers = [runner.environment.answer(e.state) for e in episodes]
    totals, columns, metrics = score(rewards, [reward_prompt(r) for r in rows], answers, rows,
                                     none_policy=none_policy)
    per_turn = torch.tensor([sum(e.turn_rewards) for e in episodes], dtype=torch.float32)  # (B,)
    total = torch.tensor(totals, dtype=torch.float32) + per_turn  # (B,)
    correct = torch.tensor(columns[rewards[0].name]) >= CORRECT_THRESHOLD  # (B,)
    metrics.update(agent_metrics(episodes))
    return total, correct, metrics


def agent_metrics(episodes: list[Episode]) -> dict[str, float]:
    """``agent/*``: turns per episode, well-formed tool calls, tool use, environment tokens, errors."""
    n = max(len(episodes), 1)
    calls = sum(e.state.tool_calls for e in episodes)
    out = {"agent/turns_mean": sum(e.num_turns for e in episodes) / n,
           "agent/tool_call_ok_frac": sum(e.state.tool_calls_ok for e in episodes) / max(calls, 1),
           "agent/tool_calls_mean": calls / n,
           "agent/tool_use_frac": sum(e.state.tool_calls > 0 for e in episodes) / n,
           "agent/env_tokens_mean": sum(len(e.ids) - sum(e.model) for e in episodes) / n,
           "agent/truncated_frac": sum(e.truncated for e in episodes) / n}
    kinds = sorted({k for e in episodes for k in e.state.errors})
    for kind in kinds:
        out[f"agent/error_{kind}_frac"] = sum(e.state.errors.get(kind, 0) for e in episodes) / max(calls, 1)
    return out


def turn_advantages(rewards: torch.Tensor, episodes: list[Episode], group_size: int, scale: str, *, width: int,
                    eps: float = 1e-6, batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) per-turn advantages: each model token gets its turn's group-relative advantage.

    Turn k's return-to-go is the episode reward minus the per-turn rewards earned before turn k,
    G_{i,k} = R_i - sum_{k' < k} r_{i,k'}, and it is baselined against the same turn of the group's other
    episodes that reached turn k (:func:`~gspo.algorithms.advantages.turn_group_advantages`):
    A_{i,t} = (G_{i,k(t)} - mean_j G_{j,k(t)}) / s_k. Turn 0 gets eq. 6 on R; without per-turn rewards
    later turns get the same comparison among the episodes that lasted that long. 0 on padding; environment
    tokens carry the value of the turn they follow but are masked out of every loss.
    """
    turns_per_episode = max(1, *(len(e.turn_rewards) for e in episodes))
    earned = torch.zeros(len(episodes), turns_per_episode)  # (B, K) per-turn rewards before turn k
    present = torch.zeros(len(episodes), turns_per_episode, dtype=torch.bool)  # (B, K)
    for i, e in enumerate(episodes):
        before = torch.tensor([0.0] + e.turn_rewards[:-1], dtype=torch.float32).cumsum(0)  # (K_i,)
        earned[i, : len(before)] = before
        present[i, : len(before)] = True
    returns = rewards.to(torch.float32)[:, None] - earned  # (B, K) G_{i,k}
    per_turn = turn_group_advantages(returns, present, group_size, scale=scale, eps=eps,
                                     batch_std=batch_std)  # (B, K)
    turns = turn_index(episodes, width)  # (B, T)
    out = per_turn.gather(1, turns.clamp_min(0).clamp_max(turns_per_episode - 1))  # (B, T)
    return torch.where(turns >= 0, out, torch.zeros_like(out))


@dataclass
class EpisodeEvaluator:
    """Held-out evaluation of an agent task: accuracy, pass@k, mean reward and the ``agent/*`` rates."""

    runner: EpisodeRunner
    render: Callable[[Row], list[int]]
    rewards: Sequence[WeightedReward]
    max_new_tokens: int
    batch_prompts: int = 64
    none_policy: str = "zero"

    def evaluate(self, rows: list[Row], *, temperature: float, samples: int = 1, ks: Sequence[int] = (),
                 seed: int = 0) -> dict[str, float]:
        if not rows:
            return {}
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=temperature)
        correct, totals, finished = [], [], []
        for start in range(0, len(rows), self.batch_prompts):
            chunk = rows[start : start + self.batch_prompts]
            sample_rows = [row for row in chunk for _ in range(samples)]
            seeds = [_row_seed(seed, start + i, j) for i in range(len(chunk)) for j in range(samples)]
            episodes, _ = self.runner.run([self.render(r) for r in sample_rows], sample_rows, params, seeds, seed=seed,
                                          record_routing=False)
            total, flags, _ = score_episodes(self.runner, episodes, sample_rows, self.rewards, self.none_policy)
            totals += total.tolist()
            correct += [int(flags[i * samples : (i + 1) * samples].sum()) for i in range(len(chunk))]
            finished += episodes
        n = len(rows)
        out = {"accuracy": sum(correct) / (n * samples), "reward": sum(totals) / len(totals)}
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / n
        out.update({k.removeprefix("agent/"): v for k, v in agent_metrics(finished).items()})
        return out
