"""gspo's Python training API, shaped like TRL's ``GRPOTrainer``.

    import gspo

    trainer = gspo.Trainer(
        model="path/to/hf-model",                  # a directory, an embedded name, or a loaded model
        train_dataset=[{"prompt": "2+3=", "answer": "5"}, ...],   # list of dicts, datasets.Dataset or a path
        rewards=[lambda prompt, completion, answer, **_: float(completion.strip() == answer)],
        config={"algorithm": "gspo", "steps": 100, "rollout.group_size": 8},
    )
    summary = trainer.train()                      # same run directory, checkpoints and resume as the CLI
    trainer.evaluate()

Rewards are plain callables, closures or objects with ``__call__``: per sample
``(prompt, completion, **row) -> float | None`` or batched like TRL's ``(prompts, completions, **columns)
-> list[float]``. A function whose first parameter is named ``prompts`` (or that carries
``batched = True``) is called once per batch. Everything else (the loop, the objectives, checkpoints) is
the same code the ``gspo train`` command runs: :func:`gspo.trainer.run.train` and
:func:`gspo.trainer.build.build`. docs/trl.md maps TRL's options onto gspo's.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from gspo.config.load import from_dict, load_config
from gspo.config.schema import Config
from gspo.errors import ConfigError

RewardLike = Callable[..., Any]


class Trainer:
    """Train ``model`` on ``train_dataset`` with ``rewards`` (see the module docstring).

    Args:
        model: a local Hugging Face model directory, an embedded model name (``tiny-arith``), or a loaded
            ``transformers`` causal LM (then ``tokenizer`` is required).
        tokenizer: a tokenizer object; default: the one saved beside ``model``.
        train_dataset: rows with a prompt column (a string or chat messages) and usually an answer column:
            a list of dicts, a ``datasets.Dataset``, or a path (JSONL / CSV / Parquet / save_to_disk).
            Default: the config's task (the embedded arithmetic task).
        eval_dataset: held-out rows in the same forms; default: ``eval.size`` training rows drawn at random
            with the config's ``seed`` (at most a fifth of them), never trained on.
        rewards: callables (per sample or batched, see the module docstring) or names of built-in rewards
            (``exact_answer``, ``math_verify``, ...); default: the task's. The first reward defines accuracy.
        reward_weights: one weight per reward (default 1.0 each).
        config: a :class:`gspo.config.Config`, a dict (nested, or with dotted keys as on the command line),
            a list of ``key=value`` strings, or a YAML path.
        run_dir: where metrics, samples and checkpoints go (default ``runs/<algorithm>-<model>-<time>``).
        callbacks: objects with any of ``on_begin(trainer)``, ``on_step(trainer, step, metrics)`` (return True to
            end training after that step), ``on_eval(trainer, step, metrics)``, ``on_save(trainer, step, path)``
            (``trainer`` is the step runner, whose ``model``, ``state`` and ``config`` they may read).
            ``gspo.trl.GRPOTrainer`` takes transformers' ``TrainerCallback``s instead.
        prompt_column / answer_column: column names in ``train_dataset`` / ``eval_dataset``.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, train_dataset: Any = None,
                 eval_dataset: Any = None, rewards: Sequence[RewardLike | str] | None = None,
                 reward_weights: Sequence[float] | None = None, config: Any = None, run_dir: str | Path | None = None,
                 callbacks: Iterable = (), prompt_column: str = "prompt", answer_column: str = "answer") -> None:
        overrides: dict[str, Any] = {}
        if isinstance(model, (str, Path)):
            overrides["model"] = str(model)
        elif model is not None and tokenizer is None:
            raise ConfigError("a loaded model needs its tokenizer: gspo.Trainer(model=model, tokenizer=tokenizer, ...)")
        if run_dir is not None:
            overrides["run_dir"] = str(run_dir)
        if isinstance(train_dataset, (str, Path)):
            overrides.update({"data.path": str(train_dataset), "data.prompt_column": prompt_column,
                              "data.answer_column": answer_column})
            train_dataset = None
        if isinstance(eval_dataset, (str, Path)):
            overrides["data.eval_path"] = str(eval_dataset)
            eval_dataset = None
        if rewards is not None:
            rewards = list(rewards)
            if reward_weights is not None and len(reward_weights) != len(rewards):
                raise ConfigError(f"reward_weights has {len(reward_weights)} weights for {len(rewards)} rewards")
        self.config = make_config(config, overrides)
        self.run_dir = Path(self.config.run_dir) if self.config.run_dir else None
        self._replace: dict[str, Any] = {}
        if model is not None and not isinstance(model, (str, Path)):
            self._replace.update(model=model, tokenizer=tokenizer)
        elif tokenizer is not None:
            self._replace["tokenizer"] = tokenizer
        if train_dataset is not None or eval_dataset is not None:
            self._replace["task"] = _task(self.config, train_dataset, eval_dataset, prompt_column, answer_column)
        if rewards is not None:
            self._replace["rewards"] = _rewards(rewards, reward_weights, self.config, self._replace.get("task"))
        self.callbacks = list(callbacks)
        self.summary: dict | None = None
        self._runner = None

    def train(self, *, resume: bool = False) -> dict:
        """Run the training loop; returns the summary (held-out accuracy before and after, lift, run dir).

        ``resume``: continue the run in ``run_dir`` from its newest valid checkpoint. Ctrl-C finishes the
        step, saves a checkpoint and raises :class:`gspo.errors.RunInterrupted` (a KeyboardInterrupt).
        """
        from gspo.trainer.run import default_run_dir, train

        if self.run_dir is None:
            self.run_dir = default_run_dir(self.config)
        hint = (f"trainer.train(resume=True), or in a new session gspo.Trainer(<the same arguments>, "
                f"run_dir={str(self.run_dir)!r}).train(resume=True)")
        self.summary = train(self.config, self.run_dir, resume=resume, callbacks=[_Keep(self), *self.callbacks],
                             resume_hint=hint, **self._replace)
        return self.summary

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (sampled and greedy) and mean reward of the current weights."""
        return self.runner.evaluate()

    @property
    def runner(self):
        """The step runner (:class:`gspo.trainer.trainer.Trainer`), built on first use."""
        if self._runner is None:
            from gspo.trainer.trainer import Trainer as Runner

            self._runner = Runner.from_config(self.config, None, **self._replace)
        return self._runner

    @property
    def model(self):
        """The policy being trained (a transformers model; PEFT-wrapped with ``lora.rank > 0``)."""
        return self.runner.model


class _Keep:
    """A built-in callback: remembers the runner a train() call used, so evaluate() sees its weights."""

    def __init__(self, api: Trainer) -> None:
        self.api = api

    def on_eval(self, runner, step: int, metrics: dict) -> None:
        self.api._runner = runner


def make_config(config: Any, overrides: Mapping[str, Any] = ()) -> Config:
    """A validated :class:`Config` from a Config, a dict (nested or dotted keys), ``key=value`` strings or a
    YAML path; ``overrides`` (dotted keys) are applied on top."""
    items = [f"{k}={_text(v)}" for k, v in dict(overrides).items()]
    if config is None:
        return load_config(None, items)
    if isinstance(config, (str, Path)):
        return load_config(config, items)
    if isinstance(config, Config):
        raw = config.to_dict()
        return load_config(None, [*_dotted(raw), *items]) if items else _validated(from_dict(raw))
    if isinstance(config, Mapping):
        return load_config(None, [*_dotted(dict(config)), *items])
    if isinstance(config, (list, tuple)) and all(isinstance(c, str) for c in config):
        return load_config(None, [*config, *items])
    raise ConfigError(f"config must be a gspo Config, a dict, a list of key=value strings or a YAML path; "
                      f"got {type(config).__name__}")


def _validated(config: Config) -> Config:
    from gspo.config.validate import validate

    validate(config)
    return config


def _dotted(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Nested or dotted dict -> ``key=value`` strings, the command line's grammar (one parser)."""
    out = []
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out.extend(_dotted(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}={_text(value)}")
    return out


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _records(dataset: Any, what: str) -> list[dict]:
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        return dataset.to_list()
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        return list(dataset)
    raise ConfigError(f"{what} must be a list of dicts, a datasets.Dataset or a path; got {type(dataset).__name__}")


def _task(config: Config, train_dataset, eval_dataset, prompt_column: str, answer_column: str):
    from gspo.tasks.datasets import rows_from_records
    from gspo.tasks.registry import build_task, rows_task

    if train_dataset is None:  # held-out rows only: the config's task for training
        base = build_task(config.data, seed=config.seed, eval_size=config.eval.size)
        base.eval_rows = rows_from_records(_records(eval_dataset, "eval_dataset"), "eval_dataset",
                                           prompt_column=prompt_column, answer_column=answer_column)[:config.eval.size]
        return base
    rows = rows_from_records(_records(train_dataset, "train_dataset"), "train_dataset", prompt_column=prompt_column,
                             answer_column=answer_column)
    held = None
    if eval_dataset is not None:
        held = rows_from_records(_records(eval_dataset, "eval_dataset"), "eval_dataset",
                                 prompt_column=prompt_column, answer_column=answer_column)
    return rows_task("dataset:in-memory", rows, held, seed=config.seed, eval_size=config.eval.size,
                     source="train_dataset", eval_source="eval_dataset" if held is not None else None)


def _rewards(rewards: list, weights: Sequence[float] | None, config: Config, task=None):
    """Callables and reward names as :class:`WeightedReward` s; names resolve against ``task`` (the in-memory
    dataset's) or the config's task, whose rows are never built for it."""
    from gspo.tasks.registry import task_rewards as rewards_of
    from gspo.tasks.rewards import WeightedReward, resolve_rewards

    weights = list(weights) if weights is not None else [1.0] * len(rewards)
    named = [f"{reward}@{weight}" for reward, weight in zip(rewards, weights) if isinstance(reward, str)]
    task_rewards = {}
    if named:
        task_rewards = task.rewards if task is not None else rewards_of(config.data, seed=config.seed)
    resolved = iter(resolve_rewards(named, task_rewards) if named else ())
    out, names = [], set()
    for reward, weight in zip(rewards, weights):
        if isinstance(reward, str):  # a built-in or module:function, resolved as the CLI does
            out.append(next(resolved))
            continue
        if not callable(reward):
            raise ConfigError(f"rewards must be callables or reward names; got {reward!r:.60}")
        name = _reward_name(reward, names)
        out.append(WeightedReward(name, as_gspo_reward(reward), float(weight)))
    return out


def _reward_name(reward, taken: set) -> str:
    base = getattr(reward, "__name__", None) or type(reward).__name__
    base = "reward" if base == "<lambda>" else base
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def is_batched(reward: RewardLike) -> bool:
    """True for a batch reward: ``batched = True``, or a first parameter named ``prompts`` (TRL's style)."""
    if getattr(reward, "batched", False):
        return True
    try:
        params = list(inspect.signature(reward).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "prompts"


def as_gspo_reward(reward: RewardLike) -> RewardLike:
    """``reward`` in gspo's calling convention: per sample as is; a TRL-style batch reward
    ``(prompts, completions, **columns)`` wrapped as gspo's batched ``(prompts, completions, rows)``."""
    if not is_batched(reward):
        return reward
    if getattr(reward, "batched", False):
        return reward  # already gspo's batched convention

    def batched(prompts, completions, rows):
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        return reward(list(prompts), list(completions), **columns)

    batched.batched = True
    batched.__name__ = getattr(reward, "__name__", "reward")
    batched.__wrapped__ = reward  # tracebacks and error messages name the user's function
    return batched
