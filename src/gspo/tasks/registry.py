"""Build the :class:`Task` a config asks for: the embedded arithmetic task or a local dataset."""

from __future__ import annotations

import random

from gspo.config.schema import DataConfig
from gspo.errors import ConfigError, DataError
from gspo.tasks.base import Task, shuffled_epochs
from gspo.tasks.datasets import load_rows


# data.task's built-in values (--help and the error below read them here)
BUILTIN_TASKS = ("arithmetic", "calculator", "reasoning_gym:<name>")


def build_task(data: DataConfig, *, seed: int, eval_size: int, needs_answer: bool = True) -> Task:
    """The task named by ``data`` (a local ``data.path`` wins over ``data.task``)."""
    if data.path:
        return _dataset_task(data, seed=seed, eval_size=eval_size, needs_answer=needs_answer)
    if data.task == "arithmetic":
        from gspo.tasks import arithmetic

        task = arithmetic.ArithmeticTask(seed=seed)
        return Task("arithmetic", task.iter_train, task.eval_rows(eval_size), _arithmetic_rewards())
    if data.task == "calculator":  # agents: multi-turn, tool-using episodes (gspo.agents)
        from gspo.agents.calculator import build_task as calculator_task

        return calculator_task(seed=seed, eval_size=eval_size)
    if data.task.startswith("reasoning_gym:"):
        from gspo.tasks.reasoning_gym import reasoning_gym_task

        return reasoning_gym_task(data.task.split(":", 1)[1], seed=seed, eval_size=eval_size)
    raise ConfigError(f"data.task={data.task!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}); "
                      "or set data.path to a local dataset file")


def task_rewards(data: DataConfig, *, seed: int) -> dict:
    """The reward table of the task ``data`` names (name -> (function, default weight)), without reading a
    dataset or generating a task's rows: what resolving a reward *name* needs (the Python API's
    ``rewards=["exact_answer", "my_rewards:score"]``)."""
    if data.path:
        from gspo.tasks.answers import ANSWER_REWARDS

        return dict(ANSWER_REWARDS)
    if data.task == "arithmetic":
        return _arithmetic_rewards()
    return build_task(data, seed=seed, eval_size=0).rewards  # the others build no held-out rows at eval_size=0


def _arithmetic_rewards() -> dict:
    from gspo.tasks import arithmetic

    return {"exact_answer": (arithmetic.exact_answer_reward, 1.0), "format": (arithmetic.format_reward, 0.0)}


# Without data.eval_path the held-out rows are a seeded random sample of eval.size rows (never the file's last
# rows: a file sorted by difficulty or by topic would hold out only its end), but never more than a fifth of the
# dataset: a 300-row file keeps 240 rows to train on instead of losing 200 to evaluation.
HELD_OUT_MAX_SHARE = 5
HELD_OUT_SEED_OFFSET = 7_919  # the held-out sample's seed is seed + this, apart from the training order's seed


def _dataset_task(data: DataConfig, *, seed: int, eval_size: int, needs_answer: bool) -> Task:
    rows = load_rows(data.path, prompt_column=data.prompt_column, answer_column=data.answer_column,
                     require_answer=needs_answer)
    eval_rows = None
    if data.eval_path:
        eval_rows = load_rows(data.eval_path, prompt_column=data.prompt_column, answer_column=data.answer_column,
                              require_answer=needs_answer)
    return rows_task(f"dataset:{data.path}", rows, eval_rows, seed=seed, eval_size=eval_size, source=data.path,
                     eval_source=data.eval_path or None)


def rows_task(name: str, rows: list, eval_rows: list | None, *, seed: int, eval_size: int, source: str = "rows",
              eval_source: str | None = None) -> Task:
    """A task over in-memory rows: the held-out rows given, else ``eval_size`` rows (at most a fifth) drawn at
    random with ``seed``; both keep the file's order."""
    from gspo.tasks.answers import ANSWER_REWARDS

    if eval_rows is not None:
        eval_rows = eval_rows[:eval_size]
        how = f" (from {eval_source or 'the held-out rows given'})"
    else:
        if len(rows) < 2:
            raise DataError(f"dataset '{source}' has {len(rows)} row; it needs at least 2 to hold some out "
                            "(or give held-out rows: data.eval_path, or eval_dataset in the Python API)")
        held = min(eval_size, len(rows) // HELD_OUT_MAX_SHARE) if eval_size else 0
        eval_rows, rows = held_out_split(rows, held, seed)
        how = (f" (a random {held} with seed={seed}: eval.size={eval_size} is capped at 1/{HELD_OUT_MAX_SHARE} of "
               "the rows; set data.eval_path for a separate held-out file)") if held < eval_size else (
            f" (a random {held} with seed={seed}; set data.eval_path for a separate held-out file)")
    note = f"data: {len(rows)} training rows, {len(eval_rows)} held out{how}"
    return Task(name, lambda: shuffled_epochs(rows, seed), eval_rows, dict(ANSWER_REWARDS), note=note)


def held_out_split(rows: list, held: int, seed: int) -> tuple[list, list]:
    """(held-out rows, training rows): ``held`` rows sampled with ``seed``, each part in the rows' order."""
    chosen = set(random.Random(seed + HELD_OUT_SEED_OFFSET).sample(range(len(rows)), held))
    return [r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen]
