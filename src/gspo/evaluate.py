"""Held-out evaluation: accuracy (pass@1), pass@k and mean reward with the rollout engine.

Accuracy uses the task's correctness reward (its first reward): a sample is correct when it scores
>= 0.5. pass@k is the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n - c, k) / C(n, k) for n
samples of which c are correct, averaged over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Callable, Sequence

from gspo.rollout.base import RolloutEngine, SamplingParams, row_seed
from gspo.tasks.base import Row, reward_prompt
from gspo.tasks.rewards import WeightedReward, score

CORRECT_THRESHOLD = 0.5  # correctness rewards are 0/1; anything at or above one half counts as right


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``n`` samples with ``c`` correct (Chen et al. 2021, eq. 1)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class Evaluator:
    engine: RolloutEngine
    render: Callable[[Row], list[int]]
    decode: Callable[[list[int]], str]
    rewards: Sequence[WeightedReward]  # rewards[0] is the correctness reward
    max_new_tokens: int
    batch_prompts: int = 64  # prompts per engine call (x samples): bounds memory on long eval sets
    none_policy: str = "zero"  # reward.none_policy: what a reward returning None means (as in training)

    def evaluate(self, rows: list[Row], *, temperature: float, samples: int = 1, ks: Sequence[int] = (),
                 seed: int = 0) -> dict[str, float]:
        """Accuracy, pass@k (k in ``ks``) and mean total reward over ``rows``."""
        if not rows:
            return {}
        correct: list[int] = []
        totals: list[float] = []
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=temperature)
        for start in range(0, len(rows), self.batch_prompts):
            chunk = rows[start : start + self.batch_prompts]
            prompts = [self.render(row) for row in chunk for _ in range(samples)]
            # per-row seeds, as in training: no generator on the engine's device, and a row's samples do
            # not depend on batch_prompts
            seeds = [row_seed(seed, start + i, j) for i in range(len(chunk)) for j in range(samples)]
            rollout = self.engine.generate(prompts, params, row_seeds=seeds)
            texts = [self.decode(ids[m].tolist()) for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]
            sample_rows = [row for row in chunk for _ in range(samples)]
            prompt_texts = [reward_prompt(row) for row in sample_rows]
            total, columns, _ = score(self.rewards, prompt_texts, texts, sample_rows, none_policy=self.none_policy)
            totals.extend(total)
            flags = [v >= CORRECT_THRESHOLD for v in columns[self.rewards[0].name]]
            correct.extend(sum(flags[i * samples : (i + 1) * samples]) for i in range(len(chunk)))
        n = len(rows)
        out = {"accuracy": sum(correct) / (n * samples), "reward": sum(totals) / len(totals)}
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / n
        return out
