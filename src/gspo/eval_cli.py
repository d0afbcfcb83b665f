"""``gspo eval MODEL_OR_RUN``: held-out accuracy (pass@1), pass@k and mean reward, as a JSON report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gspo.cli_args import Command, Option, UsageError, parse, render_help
from gspo.errors import ConfigError

EVAL = Command(
    "eval", "held-out accuracy, pass@k and mean reward (JSON report)",
    positionals=(("MODEL_OR_RUN", "an embedded model (tiny-arith), a Hugging Face model directory, a checkpoint, or "
                                  "a run directory (its latest valid checkpoint, and its task unless data.* is given)"),),
    required=1,
    options=(Option("samples", "8", "responses per prompt", kind="int", minimum=1),
             Option("k", "1,8", "pass@k for each k (comma-separated)", kind="ints", minimum=1),
             Option("temperature", "", "sampling temperature (= rollout.temperature)"),
             Option("max_new_tokens", "", "generation limit (= rollout.max_new_tokens)"),
             Option("out", "", "also write the JSON report to this path")),
    config_keys=True,
    description="Evaluates a model on a task's held-out prompts: pass@1 (accuracy), pass@k and mean reward,\n"
                "sampled and greedy. Also takes the train keys of the data.*, reward.*, eval.size and\n"
                "rollout.* sections (see gspo train --help).",
)
ROLLOUT_ALIASES = ("temperature", "max_new_tokens")  # eval's short names for rollout.* keys


@dataclass
class EvalOptions:
    samples: int = 8
    ks: tuple[int, ...] = (1, 8)
    out: str = ""


def run_eval(args: list[str]) -> int:
    parsed = parse(EVAL, args)
    if parsed.help:
        print(render_help(EVAL))
        return 0
    options = EvalOptions(samples=parsed.options["samples"], ks=parsed.options["k"], out=parsed.options.get("out", ""))
    if not options.ks:
        raise UsageError("k= names no k; write e.g. k=1,8")
    overrides = [f"rollout.{key}={parsed.options[key]}" for key in ROLLOUT_ALIASES if key in parsed.options]
    report = evaluate_target(parsed.positional(0), [*overrides, *parsed.overrides], options)
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
    _check_exists(target)
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
    from gspo.trainer.build import build_evaluation

    parts = build_evaluation(config)  # model, engine, task and evaluator only: no optimizer, no Trainer
    rows = parts.task.eval_rows
    sampled = parts.evaluator.evaluate(rows, temperature=config.rollout.temperature, samples=options.samples,
                                       ks=options.ks, seed=config.seed)
    greedy = parts.evaluator.evaluate(rows, temperature=0.0)
    parts.engine.close()
    return {"model": target, "task": parts.task.name, "prompts": len(rows), "samples": options.samples,
            "temperature": config.rollout.temperature, **{f"sampled/{k}": v for k, v in sampled.items()},
            "greedy/accuracy": greedy["accuracy"]}


def _check_exists(target: str) -> None:
    """MODEL_OR_RUN names an embedded model or an existing directory; else say so in eval's own terms."""
    from gspo.config.load import EMBEDDED_MODELS
    from gspo.suggest import did_you_mean

    path = Path(target).expanduser()
    if target in EMBEDDED_MODELS or path.exists():
        return
    parent = path.parent if path.parent.is_dir() else None
    nearby = did_you_mean(path.name, [p.name for p in parent.iterdir()]) if parent else ""
    if nearby:
        nearby = nearby.replace("'", f"'{parent}/", 1) if str(parent) != "." else nearby
    raise ConfigError(f"'{target}' does not exist: give a run directory (e.g. runs/<run name>), a checkpoint, "
                      f"a Hugging Face model directory or an embedded model ({', '.join(EMBEDDED_MODELS)})."
                      f"{nearby}")
