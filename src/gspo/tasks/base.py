"""What a task is: prompts to train on, held-out prompts to measure, and the rewards that score them.

Rows are plain dicts with at least ``prompt`` (a string or a list of chat messages) and usually
``answer``; every column is passed to reward functions as keyword arguments. Training rows come from
an endless, seeded stream, so the data position of a run is one integer (exact resume).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

Row = dict[str, Any]
RewardFn = Callable[..., Any]  # (prompt: str, completion: str, **row) -> float | None


@dataclass
class Task:
    """A training task: a fresh training stream on demand, held-out rows and default rewards.

    ``rewards`` maps a name to (function, default weight); the first one is the task's correctness
    reward, which defines accuracy (a sample is correct when it scores >= 0.5 on it).
    """

    name: str
    train_stream: Callable[[], Iterator[Row]]
    eval_rows: list[Row]
    rewards: dict[str, tuple[RewardFn, float]] = field(default_factory=dict)
    note: str = ""  # one line for the run's start (e.g. how a dataset was split into training and held-out rows)
    # agents: a gspo.agents.Environment makes this a multi-turn task; None = single completions
    environment: Any = None


def reward_prompt(row: Row) -> str:
    """The ``prompt`` a reward function receives, in training and in evaluation alike: the row's prompt
    text, or for a list of chat messages the content of the last one (the user's question)."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    return str(prompt[-1].get("content", "")) if prompt else ""


def first_distinct(rows: Iterator[Row], n: int) -> list[Row]:
    """The first ``n`` rows of an endless stream with distinct prompts (held-out sets count each once)."""
    if n <= 0:  # nothing to take: return before reading the stream, which may never end
        return []
    out, seen = [], set()
    for row in rows:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            out.append(row)
        if len(out) == n:
            return out
    raise ValueError(f"the stream ended before {n} distinct prompts")


def shuffled_epochs(rows: Sequence[Row], seed: int) -> Iterator[Row]:
    """Endless epochs over ``rows``, each a fresh seeded permutation."""
    for epoch in itertools.count():
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in order:
            yield rows[i]


class DataCursor:
    """Reads rows from a task's training stream and remembers how many it has handed out."""

    def __init__(self, stream: Callable[[], Iterator[Row]], position: int = 0) -> None:
        self._stream = stream
        self._iter = stream()
        self.position = 0
        self.skip(position)

    def take(self, n: int) -> list[Row]:
        rows = list(itertools.islice(self._iter, n))
        self.position += len(rows)
        if len(rows) < n:
            raise ValueError("the training stream ended; task streams must be endless")
        return rows

    def skip(self, n: int) -> None:
        """Advance by ``n`` rows (resume)."""
        for _ in itertools.islice(self._iter, n):
            self.position += 1
