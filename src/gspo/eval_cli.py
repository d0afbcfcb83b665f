"""``gspo eval MODEL_OR_RUN``: held-out accuracy (pass@1), pass@k and mean reward, as a JSON report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gspo.errors import ConfigError

EVAL_HELP = """usage: gspo eval MODEL_OR_RUN [key=value ...]

MODEL_OR_RUN: an embedded model (tiny-arith), a Hugging Face model directory, a checkpoint, or a run
directory (its latest valid checkpoint, and its task unless data.* is given).

options: samples=8 (per prompt)  k=1,8 (pass@k)  temperature=1.0  max_new_tokens=...  out=PATH.json
and any train key of the data.*, reward.*, eval.size and rollout.* sections (see gspo train --help)."""

EVAL_KEYS = ("samples", "k", "out")


@dataclass
class EvalOptions:
    samples: int = 8
    ks: tuple[int, ...] = (1, 8)
    out: str = ""


def run_eval(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(EVAL_HELP)
        return 0 if args else 2
    target, overrides = args[0], args[1:]
    options, overrides = _split_options(overrides)
    report = evaluate_target(target, overrides, options)
    text = json.dumps(report, indent=2)
    print(text)
    if options.out:
        Path(options.out).write_text(text)
    return 0


def evaluate_target(target: str, overrides: list[str], options: EvalOptions) -> dict:
    """Load the model behind ``target`` and evaluate it on the configured task's held-out rows."""
    from gspo.checkpoint import find_latest_checkpoint
    from gspo.config import load_config

    run_dir = Path(target)
    base: list[str] = []
    if (run_dir / "config.json").exists() and (run_dir / "checkpoints").exists():
        saved = json.loads((run_dir / "config.json").read_text())
        base = [f"data.{k}={v}" for k, v in saved["data"].items() if v != ""]
        base += [f"rollout.max_new_tokens={saved['rollout']['max_new_tokens']}",
                 f"rollout.temperature={saved['rollout']['temperature']}"]
        checkpoint = find_latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"run '{run_dir}' has no valid checkpoint to evaluate")
        target = str(checkpoint)
    config = load_config(None, [f"model={target}", *base, *overrides])
    if max(options.ks) > options.samples:
        raise ConfigError(f"pass@{max(options.ks)} needs samples >= {max(options.ks)}; set samples={max(options.ks)}")
    from gspo.trainer.trainer import Trainer

    trainer = Trainer(config, run_dir=None)
    rows = trainer.task.eval_rows
    sampled = trainer.evaluator.evaluate(rows, temperature=config.rollout.temperature, samples=options.samples,
                                         ks=options.ks, seed=config.seed)
    greedy = trainer.evaluator.evaluate(rows, temperature=0.0)
    return {"model": target, "task": trainer.task.name, "prompts": len(rows), "samples": options.samples,
            "temperature": config.rollout.temperature, **{f"sampled/{k}": v for k, v in sampled.items()},
            "greedy/accuracy": greedy["accuracy"]}


def _split_options(args: list[str]) -> tuple[EvalOptions, list[str]]:
    options, rest = EvalOptions(), []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "samples":
            options.samples = _int(key, value)
        elif key == "k":
            options.ks = tuple(_int(key, v) for v in value.split(","))
        elif key == "out":
            options.out = value
        elif key in ("temperature", "max_new_tokens"):
            rest.append(f"rollout.{arg}")
        else:
            rest.append(arg)
    return options, rest


def _int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be a whole number") from None
    if number < 1:
        raise ConfigError(f"{key}={number} must be >= 1")
    return number
