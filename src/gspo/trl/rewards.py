"""TRL's reward functions on gspo's batched reward interface.

TRL calls each reward once per batch with keywords (trl/trainer/grpo_trainer.py, ``_calculate_rewards``)::

    f(prompts=[...], completions=[...], completion_ids=[[...], ...], trainer_state=state,
      log_extra=fn, log_metric=fn, **columns) -> list[float | None]

``prompts`` / ``completions`` are strings, or for conversational data the prompt's messages and
``[{"role": "assistant", "content": text}]``; every other dataset column arrives as a list, one value
per completion. :class:`TRLReward` makes such a function a gspo batched reward (``batched = True``,
``(prompts, completions, rows) -> list``): one call per rollout batch. ``None`` (and NaN) mean "no
score", which gspo counts as 0.0 as TRL's NaN-ignoring sum does. ``completion_ids`` are the
completion re-tokenised (the sampled ids can differ where a tokenisation is not canonical). ``async``
functions are awaited. A string is a local reward-model directory (gspo's ``rm:<dir>``); Hub ids and
loaded ``nn.Module`` reward models are refused.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from gspo.errors import ConfigError

OWN_KEYS = ("prompt", "completion", "completion_ids")  # row keys TRL does not pass as columns


class TRLReward:
    """A TRL-signature reward as gspo's batched reward; ``owner`` supplies the state and collects logs."""

    batched = True

    def __init__(self, fn: Callable[..., Any], tokenizer, owner) -> None:
        self.fn, self.tokenizer, self.owner = fn, tokenizer, owner
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__wrapped__ = fn  # gspo's errors name the user's function

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> list[Any]:
        originals = [row["prompt"] for row in rows]  # the dataset's prompt: a string or chat messages
        conversational = not isinstance(originals[0], str)
        texts = [[{"role": "assistant", "content": c}] for c in completions] if conversational else list(completions)
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in OWN_KEYS}
        ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        values = self.fn(prompts=originals, completions=texts, completion_ids=ids, trainer_state=self.owner.state,
                         log_extra=self.owner.log_extra, log_metric=self.owner.log_metric, **columns)
        if inspect.isawaitable(values):
            values = asyncio.run(_awaited(values))
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]


async def _awaited(values):
    return await values


class RewardLogs:
    """What reward functions hand to ``log_metric`` / ``log_extra``; metrics are averaged into the next log."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list] = defaultdict(list)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column].extend(values)

    def take_metrics(self) -> dict[str, float]:
        out = {name: sum(v) / len(v) for name, v in self.metrics.items() if v}
        self.metrics.clear()
        return out


def gspo_rewards(reward_funcs: Any, tokenizer, owner, *, device: str = "cpu") -> list:
    """``reward_funcs`` (one or a list) as rewards for :class:`gspo.Trainer`; reward models run on ``device``."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ConfigError("GRPOTrainer(reward_funcs=[]): give at least one reward function")
    return [_one(f, tokenizer, owner, device) for f in funcs]


def _one(fn: Any, tokenizer, owner, device: str):
    if isinstance(fn, (str, Path)):
        path = Path(fn).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"GRPOTrainer(reward_funcs={str(fn)!r}): gspo loads reward models from local "
                              "directories only (nothing is downloaded); pass the directory of a saved "
                              "AutoModelForSequenceClassification")
        from gspo.tasks.reward_model import RewardModel

        model = RewardModel(str(path), device=device)
        model.__name__ = path.resolve().name  # TRL names a reward model by its directory: rewards/<name>/mean
        return model
    if _is_module(fn):
        raise ConfigError("GRPOTrainer(reward_funcs=<loaded nn.Module>): pass the reward model's directory as a "
                          "string (gspo loads it as rm:<dir>, one forward per step)")
    if not callable(fn):
        raise ConfigError(f"GRPOTrainer(reward_funcs=...): {fn!r:.60} is neither a function nor a model directory")
    return TRLReward(fn, tokenizer, owner)


def _is_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)
