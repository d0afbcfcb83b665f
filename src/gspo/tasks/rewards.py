"""Reward functions: resolve them from the config, call them, and report bad returns precisely.

A reward is a plain callable ``(prompt, completion, **row) -> float``. Several combine by weights.
User code is imported only from an explicit ``module:function`` in the config (never from a
checkpoint). A reward whose ``batched`` attribute is true is instead called once per batch,
``(prompts, completions, rows) -> list``, e.g. a reward model (``rm:<model dir>``, one forward over
every completion of a step). Policy for returns (per value, batched or not):

- a finite number (bool, int, float, or a 0-d numeric) is the reward;
- ``None`` means "cannot score" (e.g. no parsable answer): 0.0 with ``reward.none_policy=zero``
  (counted in the metrics as ``reward/<name>/none_frac``), an error with ``none_policy=error``;
- NaN, inf, a string or anything else, and an exception, stop the run with a :class:`RewardError`
  naming the function, the sample index and the start of the completion.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

from gspo.errors import ConfigError, RewardError
from gspo.tasks.base import RewardFn, Row


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../gspo/
REWARD_MODEL_PREFIX = "rm:"  # reward.functions=rm:<sequence-classification model dir>@weight


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float


def resolve_rewards(specs: Sequence[str], task_rewards: dict[str, tuple[RewardFn, float]], *,
                    device: str | None = None) -> list[WeightedReward]:
    """Turn ``name``, ``name@weight``, ``module:function@weight`` or ``rm:<model dir>@weight`` specs into callables.

    Empty ``specs`` means the task's own rewards with their default weights. ``device``: where reward
    models run (default: the CPU).
    """
    if not specs:
        return [WeightedReward(name, fn, weight) for name, (fn, weight) in task_rewards.items()]
    resolved = []
    for spec in specs:
        target, _, weight_text = spec.partition("@")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ConfigError(f"reward '{spec}': the weight after '@' must be a number, e.g. {target}@0.5") from None
        if target.startswith(REWARD_MODEL_PREFIX):
            from gspo.tasks.reward_model import RewardModel

            resolved.append(WeightedReward(target, RewardModel(target[len(REWARD_MODEL_PREFIX):], device=device),
                                           weight))
        elif ":" in target:
            resolved.append(WeightedReward(target, _import_reward(target), weight))
        elif target in task_rewards:
            resolved.append(WeightedReward(target, task_rewards[target][0], weight))
        else:
            from gspo.tasks.answers import ANSWER_REWARDS, OPTIONAL_REWARDS

            if target in OPTIONAL_REWARDS and target not in ANSWER_REWARDS:  # its extra is not installed
                raise ConfigError(f"reward '{target}' needs {OPTIONAL_REWARDS[target]}")
            known = ", ".join(task_rewards) or "none"
            raise ConfigError(
                f"unknown reward '{target}'. This task's rewards: {known}; "
                "or load your own as module:function (e.g. my_rewards:score)"
            )
    return resolved


def _import_reward(target: str) -> RewardFn:
    """``module:function``, looked up in the current directory first, then on ``sys.path``.

    The ``gspo`` console script does not put the working directory on ``sys.path`` (``python -m`` does),
    so a ``my_rewards.py`` beside the user would not be found; it is added for this import only.
    """
    module_name, _, attr = target.partition(":")
    try:
        module = _import_from_cwd(module_name)
    except ImportError as exc:
        if exc.name and exc.name != module_name and not module_name.startswith(exc.name + "."):
            raise ConfigError(f"reward '{target}': importing '{module_name}' failed: {exc} "
                              "(a module it imports is missing; install it)") from None
        raise ConfigError(
            f"reward '{target}': cannot import module '{module_name}': it is neither in the current directory "
            f"({os.getcwd()}) nor on PYTHONPATH; put {module_name.replace('.', '/')}.py in the directory you run gspo from, or add "
            "its directory to PYTHONPATH"
        ) from None
    except Exception as exc:  # a bug at the module's top level: show where
        raise ConfigError(f"reward '{target}': importing '{module_name}' raised {type(exc).__name__}: {exc}"
                          f"{_user_frames(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward '{target}': module '{module_name}' has no callable '{attr}'")
    return fn


def _import_from_cwd(module_name: str):
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(cwd)  # the first occurrence: ours (a cwd already on the path stays)


def _user_frames(exc: BaseException) -> str:
    """The traceback of ``exc`` without gspo's own frames, as indented ``File ..., line N`` lines."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not _is_own_file(frame.filename)]
    if not frames:
        return ""
    return "\n" + "".join(traceback.format_list(frames)).rstrip("\n")


def _is_own_file(filename: str) -> bool:
    """gspo's files and importlib's (``<frozen importlib._bootstrap>``) are not the user's code."""
    return filename.startswith("<frozen") or os.path.abspath(filename).startswith(_PACKAGE_DIR)


def score(
    rewards: Sequence[WeightedReward],
    prompts: Sequence[str],
    completions: Sequence[str],
    rows: Sequence[Row],
    *,
    none_policy: str = "zero",
) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
    """Weighted total per completion, each function's values (None -> 0.0), and mean / None-share metrics."""
    totals = [0.0] * len(completions)
    columns: dict[str, list[float]] = {}
    metrics: dict[str, float] = {}
    for reward in rewards:
        values, nones = [], 0
        raw = _call_batched(reward, prompts, completions, rows) if getattr(reward.fn, "batched", False) else None
        for i, (prompt, completion, row) in enumerate(zip(prompts, completions, rows)):
            if raw is None:
                value = _call(reward, i, prompt, completion, row, none_policy)
            else:
                value = _check(raw[i], _where(reward, i, completion), none_policy)
            if value is None:
                nones += 1
                value = 0.0
            values.append(value)
            totals[i] += reward.weight * value
        columns[reward.name] = values
        metrics[f"reward/{reward.name}"] = sum(values) / max(len(values), 1)
        if nones:
            metrics[f"reward/{reward.name}/none_frac"] = nones / len(values)
    return totals, columns, metrics


def _call(reward: WeightedReward, index: int, prompt: str, completion: str, row: Row, none_policy: str) -> Any:
    where = _where(reward, index, completion)
    kwargs = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    try:
        value = reward.fn(prompt, completion, **kwargs)
    except Exception as exc:  # user code: which function and sample, where in it, and on what input
        raise RewardError(f"{where} raised {type(exc).__name__}: {exc}{_user_frames(exc)}"
                          f"{_inputs_text(prompt, completion)}") from exc
    return _check(value, where, none_policy)


def _call_batched(reward: WeightedReward, prompts: Sequence[str], completions: Sequence[str],
                  rows: Sequence[Row]) -> list[Any]:
    """One call for the whole batch; it must return one value per completion."""
    try:
        values = list(reward.fn(list(prompts), list(completions), list(rows)))
    except Exception as exc:
        raise RewardError(f"reward '{reward.name}' on a batch of {len(completions)} completions raised "
                          f"{type(exc).__name__}: {exc}{_user_frames(exc)}") from exc
    if len(values) != len(completions):
        raise RewardError(f"reward '{reward.name}' returned {len(values)} values for {len(completions)} completions; "
                          "a batched reward returns one value per completion")
    return values


def _inputs_text(prompt: str, completion: str, limit: int = 500) -> str:
    """The sample that made a reward fail, in full up to ``limit`` characters each."""
    return f"\nprompt: {_clip(prompt, limit)!r}\ncompletion: {_clip(completion, limit)!r}"


def _clip(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _where(reward: WeightedReward, index: int, completion: str) -> str:
    return f"reward '{reward.name}' on sample {index} (completion {completion[:60]!r})"


def _check(value: Any, where: str, none_policy: str) -> float | None:
    """The reward as a float, None (cannot score), or a RewardError saying what was wrong with it."""
    if value is None:
        if none_policy == "error":
            raise RewardError(f"{where} returned None; return a number, or set reward.none_policy=zero")
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{where} returned {type(value).__name__} {value!r}; rewards must be numbers")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"{where} returned {value}; rewards must be finite numbers")
    return value
