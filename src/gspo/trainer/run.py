"""A whole training run: resume, evaluate before, train with checkpoints, evaluate after, summarise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gspo import distributed as dist
from gspo.checkpoint import find_latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint, capture_rng_state
from gspo.config.schema import Config
from gspo.errors import CheckpointError, TrainingDiverged
from gspo.signals import GracefulInterrupt
from gspo.trainer.progress import Progress
from gspo.trainer.trainer import Trainer, TrainState

# Config sections that may differ between a run and its resumption (they change no training math).
RESUMABLE_DIFFERENCES = ("steps", "eval", "checkpoint", "log", "device")


def default_run_dir(config: Config) -> Path:
    model = Path(config.model).name or "model"
    return Path("runs") / f"{config.algorithm}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: Config, run_dir: Path | None = None, *, resume: bool = False, console=None) -> dict:
    """Train per ``config``; returns the summary (also written to ``run_dir/summary.json``)."""
    run_dir = Path(run_dir or config.run_dir or default_run_dir(config))
    if resume:
        check_resumable(config, run_dir)
    trainer = Trainer(config, run_dir)
    trainer.save_resolved_config()
    if resume:
        _restore(trainer, run_dir)
    progress = Progress(config.steps, enabled=config.log.progress and dist.is_main(), console=console)
    if "before" not in trainer.state.history:
        trainer.state.history["before"] = trainer.evaluate()
        progress.note("held-out before training: " + _eval_text(trainer.state.history["before"]))
    metrics: dict = {}
    with GracefulInterrupt() as interrupt, progress:
        while trainer.state.step < config.steps:
            try:
                metrics = trainer.train_step()
            except TrainingDiverged:
                progress.note(f"stopped: training diverged; the last good checkpoint in {run_dir} is kept")
                raise
            progress.update(trainer.state.step, metrics)
            step = trainer.state.step
            if config.eval.every and step % config.eval.every == 0 and step < config.steps:
                evaluation = trainer.evaluate()
                trainer.logger.log(step, evaluation)
                progress.note(f"step {step} held-out: " + _eval_text(evaluation))
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                _save(trainer, run_dir)
            if interrupt.requested:
                _save(trainer, run_dir)
                progress.note(f"interrupted at step {step}; checkpoint saved. Resume with: "
                              f"gspo train --resume {run_dir}")
                sys.exit(interrupt.exit_code)
    after = trainer.evaluate()
    trainer.logger.log(trainer.state.step, after)
    _save(trainer, run_dir)
    summary = _summary(trainer, after, metrics, run_dir)
    progress.note("held-out after training:  " + _eval_text(after))
    progress.note(_lift_text(summary))
    trainer.logger.close()
    return summary


def check_resumable(config: Config, run_dir: Path) -> None:
    """A resume needs a checkpoint and a config that trains the same way."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        raise CheckpointError(f"cannot resume: '{run_dir}' has no config.json; is it a gspo run directory?")
    saved = json.loads(saved_path.read_text())
    current = config.to_dict()
    diffs = [k for k in _flatten(current) if k.split(".")[0] not in RESUMABLE_DIFFERENCES
             and _flatten(saved).get(k) != _flatten(current)[k] and k != "run_dir"]
    if diffs:
        detail = ", ".join(f"{k}: {_flatten(saved).get(k)!r} -> {_flatten(current)[k]!r}" for k in diffs[:5])
        raise CheckpointError(f"cannot resume '{run_dir}' with a different config ({detail}); "
                              "resume with the run's own config, or start a new run")


def _restore(trainer: Trainer, run_dir: Path) -> None:
    path = find_latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"cannot resume: no valid checkpoint under '{run_dir}/checkpoints'")
    loaded = load_checkpoint(path, model=trainer.model, optimizer=trainer.parts.optimizer,
                             scheduler=trainer.parts.scheduler)
    trainer.state = TrainState(**loaded["trainer_state"])
    trainer.data.skip(trainer.state.data_position)
    trainer.parts.engine.sync_weights(trainer.model)
    if loaded.get("rng"):
        restore_rng_state(loaded["rng"])


def _save(trainer: Trainer, run_dir: Path) -> None:
    if dist.is_main():
        save_checkpoint(run_dir, trainer.state.step, model=trainer.model, tokenizer=trainer.parts.tokenizer,
                        optimizer=trainer.parts.optimizer, scheduler=trainer.parts.scheduler,
                        trainer_state=vars(trainer.state), rng=capture_rng_state(),
                        keep_last=trainer.config.checkpoint.keep_last)
    dist.barrier()


def _summary(trainer: Trainer, after: dict, last: dict, run_dir: Path) -> dict:
    before = trainer.state.history["before"]
    summary = {"run_dir": str(run_dir), "steps": trainer.state.step, "before": before, "after": after,
               "lift/accuracy": after["eval/accuracy"] - before["eval/accuracy"]}
    if "eval/greedy_accuracy" in after:
        summary["lift/greedy_accuracy"] = after["eval/greedy_accuracy"] - before["eval/greedy_accuracy"]
    if dist.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _eval_text(evaluation: dict) -> str:
    text = f"accuracy {evaluation['eval/accuracy']:.1%} (sampled)"
    if "eval/greedy_accuracy" in evaluation:
        text += f", {evaluation['eval/greedy_accuracy']:.1%} (greedy)"
    return text


def _lift_text(summary: dict) -> str:
    text = f"lift: {summary['lift/accuracy'] * 100:+.1f} points sampled"
    if "lift/greedy_accuracy" in summary:
        text += f", {summary['lift/greedy_accuracy'] * 100:+.1f} points greedy"
    return text + f"  ->  {summary['run_dir']}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
