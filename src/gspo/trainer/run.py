"""A whole training run: resume, evaluate before, train with checkpoints, evaluate after, summarise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from gspo import distributed as dist
from gspo.checkpoint import find_latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint, capture_rng_state
from gspo.checkpoint.manifest import checkpoints_root, list_step_dirs
from gspo.checkpoint.sharded import (is_sharded_checkpoint, load_sharded_weights, stage_sharded_weights,
                                     use_sharded_checkpoint)
from gspo.config.schema import Config
from gspo.errors import CheckpointError, RunInterrupted, TrainingDiverged
from gspo.signals import GracefulInterrupt
from gspo.trainer.logging import drop_records_after
from gspo.trainer.plausibility import StepWatch, config_warnings
from gspo.trainer.progress import Progress
from gspo.trainer.trainer import NO_SIGNAL_HINT, Trainer, TrainState

# Config sections that may differ between a run and its resumption (they change no training math).
RESUMABLE_DIFFERENCES = ("steps", "eval", "checkpoint", "log", "device")


def default_run_dir(config: Config) -> Path:
    model = Path(config.model).name or "model"
    return Path("runs") / f"{config.algorithm}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: Config, run_dir: Path | None = None, *, resume: bool = False, console=None,
          callbacks: Sequence = (), resume_hint: str | None = None, **replace) -> dict:
    """Train per ``config``; returns the summary (also written to ``run_dir/summary.json``).

    ``callbacks``: objects with any of ``on_begin(trainer)``, ``on_step(trainer, step, metrics)``, ``on_eval(trainer,
    step, metrics)`` and ``on_save(trainer, step, path)``; an ``on_step`` that returns True ends training after
    that step (evaluated and saved as a normal end). ``replace``: components given instead of built
    (``model``, ``tokenizer``, ``task``, ``rewards``, ``engine``; see :func:`gspo.trainer.build.build`).
    A signal (Ctrl-C, SIGTERM) finishes the step, saves a checkpoint and raises :class:`RunInterrupted`, whose
    message says how to resume: ``resume_hint``, default ``gspo train --resume RUN_DIR`` (the Python API
    names ``trainer.train(resume=True)``).
    """
    run_dir = Path(run_dir or config.run_dir or default_run_dir(config))
    if resume:
        check_resumable(config, run_dir)
        finished = _finished_summary(run_dir, config.steps)
        if finished is not None:
            _say(None, f"'{run_dir}' already finished {finished['steps']} of {config.steps} steps; nothing to do "
                       f"(resume with steps=<more> to train on)")
            return finished
    trainer = Trainer.from_config(config, run_dir, **replace)
    try:  # rollout.max_staleness > 0: the sampler process stops with the run, however the run ends
        return _run(trainer, config, run_dir, resume, console, callbacks,
                    resume_hint or f"gspo train --resume {run_dir}")
    finally:
        trainer.close()


def _run(trainer: Trainer, config: Config, run_dir: Path, resume: bool, console, callbacks: Sequence,
         resume_hint: str) -> dict:
    """The body of :func:`train` once the trainer is built."""
    hooks = _Callbacks(trainer, callbacks)
    trainer.save_resolved_config()
    progress = Progress(config.steps, enabled=config.log.progress and dist.is_main(), console=console,
                        every=config.log.every)
    if resume:
        _restore(trainer, run_dir, progress)
    _say(progress, _setup_text(trainer))
    for warning in config_warnings(config):
        _say(progress, warning)
    if trainer.task.note:
        _say(progress, trainer.task.note)
    hooks.on_begin()
    if "before" not in trainer.state.history:
        trainer.state.history["before"] = trainer.evaluate()
        trainer.logger.log(0, trainer.state.history["before"])
        hooks.on_eval(0, trainer.state.history["before"])
        if trainer.task.eval_rows:  # no held-out rows (gspo.trl without an eval_dataset): nothing to report
            _say(progress, "held-out before training: " + _eval_text(trainer.state.history["before"]))
        if trainer.state.history["before"].get("eval/accuracy", 1.0) == 0.0 and trainer.task.eval_rows:
            _say(progress, "warning: 0% held-out accuracy before training: if the model should know this task, "
                           + NO_SIGNAL_HINT)
    metrics: dict = {}
    every = config.eval_every
    watch = StepWatch()
    with GracefulInterrupt() as interrupt, progress:
        while trainer.state.step < config.steps:
            try:
                metrics = trainer.train_step()
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"training diverged at step {trainer.state.step + 1}: {exc}. "
                                       f"{_last_good_text(run_dir)}") from None
            step = trainer.state.step
            progress.update(step, metrics)
            stop = hooks.on_step(step, metrics)
            if (warning := watch.observe(step, metrics)) is not None:
                _say(progress, warning)
            while trainer.notes:
                _say(progress, trainer.notes.pop(0))
            if every and step % every == 0 and step < config.steps:
                evaluation = trainer.evaluate()
                trainer.logger.log(step, evaluation)
                hooks.on_eval(step, evaluation)
                _say(progress, f"step {step} held-out: " + _eval_text(evaluation))
            saved = bool(config.checkpoint.every) and step % config.checkpoint.every == 0
            if saved:
                hooks.on_save(step, _save(trainer, run_dir))
            if interrupt.requested:
                if not saved:
                    hooks.on_save(step, _save(trainer, run_dir))
                break
            if stop:  # a callback ended training: the run finishes as if this were its last step
                break
    if interrupt.requested:  # signal handlers are restored: a second signal now acts at once
        trainer.logger.close()
        message = (f"interrupted at step {trainer.state.step} of {config.steps}; checkpoint saved. "
                   f"Resume with: {resume_hint}")
        _say(progress, message)
        raise RunInterrupted(message, exit_code=interrupt.exit_code, run_dir=run_dir)
    after = trainer.evaluate()
    trainer.logger.log(trainer.state.step, after)
    hooks.on_eval(trainer.state.step, after)
    hooks.on_save(trainer.state.step, _save(trainer, run_dir))
    summary = _summary(trainer, after, metrics, run_dir)
    if trainer.task.eval_rows:
        _say(progress, "held-out after training:  " + _eval_text(after))
        _say(progress, _lift_text(summary))
    else:
        _say(progress, f"trained {trainer.state.step} steps (no held-out rows to evaluate)  ->  {run_dir}")
    trainer.logger.close()
    return summary


class _Callbacks:
    """Calls the user's callbacks (any object with some of on_begin / on_step / on_eval / on_save), on rank 0."""

    def __init__(self, trainer: Trainer, callbacks: Sequence) -> None:
        self.trainer, self.callbacks = trainer, list(callbacks) if dist.is_main() else []

    def _call(self, name: str, *args) -> bool:
        """Call ``name`` on every callback that has it; True when one of them returned True."""
        answers = [getattr(callback, name)(self.trainer, *args) for callback in self.callbacks
                   if getattr(callback, name, None) is not None]
        return any(answer is True for answer in answers)

    def on_begin(self) -> None:
        self._call("on_begin")

    def on_step(self, step: int, metrics: dict) -> bool:
        """Whether a callback asked to stop (on rank 0; every process learns it, so all stop together)."""
        return any(dist.all_gather_object(self._call("on_step", step, metrics)))

    def on_eval(self, step: int, metrics: dict) -> None:
        self._call("on_eval", step, metrics)

    def on_save(self, step: int, path) -> None:
        self._call("on_save", step, path)


def _finished_summary(run_dir: Path, steps: int) -> dict | None:
    """The saved summary of a run that already trained ``steps`` steps (a resume then has nothing to do)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("steps", 0) >= steps else None


def _setup_text(trainer) -> str:
    """One line on how this run samples, where its old log-probabilities come from and which replay is on."""
    cfg = trainer.config
    text = (f"{cfg.algorithm} on {cfg.model}: {trainer.parts.engine.info.name}; "
            f"old log-probs {trainer.old_logprobs_plan.describe()}; {trainer.parts.precision.describe()}")
    if trainer.parts.moe:
        replay = cfg.moe.routing_replay
        text += "; routing replay " + ({"off": "off", "r2": "R2 (old-policy pass)", "r3": "R3 (rollout engine)"}[replay])
    if trainer.parts.memory is not None:
        text += f"; {trainer.parts.memory.describe()}"
    return text


def check_resumable(config: Config, run_dir: Path) -> None:
    """A resume needs a run directory (its config.json) and a config that trains the same way."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        raise CheckpointError(f"cannot resume: '{run_dir}' has no config.json; is it a gspo run directory?")
    try:
        saved = json.loads(saved_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot resume: '{saved_path}' is not valid JSON ({exc}); "
                              "restore it or start a new run") from None
    current = config.resolved_dict()
    diffs = [k for k in _flatten(current) if k.split(".")[0] not in RESUMABLE_DIFFERENCES
             and _flatten(saved).get(k) != _flatten(current)[k] and k != "run_dir"]
    if diffs:
        detail = ", ".join(f"{k}: {_flatten(saved).get(k)!r} -> {_flatten(current)[k]!r}" for k in diffs[:5])
        raise CheckpointError(f"cannot resume '{run_dir}' with a different config ({detail}); "
                              "resume with the run's own config, or start a new run")


def _restore(trainer: Trainer, run_dir: Path, progress: Progress) -> None:
    """Load the newest checkpoint that verifies (corrupt ones are skipped with a warning).

    A run killed before its first save has none: it starts again from step 0.
    """
    path = find_latest_checkpoint(run_dir)
    if path is None:
        if list_step_dirs(checkpoints_root(run_dir)):
            raise CheckpointError(f"cannot resume: no checkpoint under '{checkpoints_root(run_dir)}' verifies "
                                  "(see the warnings above); start a new run")
        _say(progress, f"'{run_dir}' has no checkpoint yet (stopped before the first save): starting at step 0")
    else:
        loaded = _load(trainer, path)
        try:
            trainer.state = TrainState(**loaded["trainer_state"])
        except TypeError as exc:
            raise CheckpointError(f"{path / 'trainer_state.json'} does not fit this gspo's TrainState ({exc}); "
                                  "resume with the gspo version that wrote it") from None
        trainer.data.skip(trainer.state.data_position)
        trainer.sync_engine()
        _restore_reference(trainer, path, loaded["reference"])
        if loaded.get("rng"):
            restore_rng_state(loaded["rng"])
        _say(progress, f"resuming from {path} (step {trainer.state.step})")
    if dist.is_main():  # the steps after the checkpoint are redone: their old log lines go
        drop_records_after(run_dir, trainer.state.step)
        trainer.logger.resume_at(trainer.state.step)


def _load(trainer: Trainer, path: Path) -> dict:
    """Load the checkpoint at ``path`` into the trainer's model, optimizer, scheduler and reference.

    Sharded checkpoints (DCP) load into the model and optimizer on every process, resharded; whole ones
    are read by rank 0 and scattered into FSDP2 shards (the name-keyed optimizer state too), or loaded
    as they are without FSDP2. Either layout resumes with any process count.
    """
    model, optimizer = trainer.model, trainer.parts.optimizer
    if is_sharded_checkpoint(path):
        load_sharded_weights(path, model=model, policy=trainer.policy, optimizer=optimizer)
        model, optimizer = None, None
    elif trainer.parts.sharded:
        optimizer = FullStateOptimizer(trainer)
    return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=trainer.parts.scheduler,
                           reference=trainer.parts.reference)


def _restore_reference(trainer: Trainer, path: Path, loaded: bool) -> None:
    """The KL reference of a refreshed run (``loss.ref_refresh_steps``): loaded from the checkpoint, or the
    checkpoint's own weights when it was refreshed at that very step (see :func:`_save`)."""
    taken = trainer.state.reference_step
    if trainer.parts.reference is None or taken == 0 or loaded:
        return
    if taken != trainer.state.step:
        raise CheckpointError(f"{path} lacks the KL reference of step {taken} (reference.safetensors); "
                              "resume it with the gspo version that wrote it, or start a new run")
    trainer.parts.refresh_reference()


class FullStateOptimizer:
    """The optimizer as the checkpoint module sees it: one process's whole state, keyed by parameter
    name, whatever the number of processes or sharding (so any process count can load it)."""

    def __init__(self, trainer: Trainer, state: dict | None = None) -> None:
        self.trainer, self.state = trainer, state

    def state_dict(self) -> dict:
        return self.state if self.state is not None else dist.full_optimizer_state(
            self.trainer.policy, self.trainer.parts.optimizer)

    def load_state_dict(self, state: dict) -> None:
        dist.load_full_optimizer_state(self.trainer.policy, self.trainer.parts.optimizer, state)


def _save(trainer: Trainer, run_dir: Path) -> Path:
    """Save a checkpoint of the current step (every process takes part; rank 0 writes); its path."""
    if trainer.pipeline is not None:  # the batches in flight, with the weights version that sampled them
        trainer.state.in_flight = trainer.pipeline.checkpoint_state()
    path = checkpoints_root(run_dir) / f"step-{trainer.state.step:08d}"
    # a reference refreshed at an earlier step is saved; one refreshed at this step is these weights
    refreshed = trainer.state.reference_step not in (0, trainer.state.step)
    staged, model_state, optimizer = None, None, None
    if use_sharded_checkpoint(trainer.model):  # every process writes its shards (gspo.checkpoint.sharded)
        staged = stage_sharded_weights(run_dir, trainer.state.step, model=trainer.model, policy=trainer.policy,
                                       optimizer=trainer.parts.optimizer)
    else:  # whole weights and optimizer state gathered to rank 0 (collectives), which writes them
        optimizer = FullStateOptimizer(trainer, dist.full_optimizer_state(trainer.policy, trainer.parts.optimizer))
        model_state = dist.full_model_state(trainer.model) if trainer.parts.sharded else None
    if dist.is_main():
        path = save_checkpoint(run_dir, trainer.state.step, model=trainer.model, model_state=model_state,
                               tokenizer=trainer.parts.tokenizer, optimizer=optimizer,
                               scheduler=trainer.parts.scheduler, trainer_state=vars(trainer.state),
                               rng=capture_rng_state(), keep_last=trainer.config.checkpoint.keep_last,
                               reference=trainer.parts.reference if refreshed else None, staged=staged)
    dist.barrier()
    return path


def _summary(trainer: Trainer, after: dict, last: dict, run_dir: Path) -> dict:
    before = trainer.state.history["before"]
    summary = {"run_dir": str(run_dir), "steps": trainer.state.step, "before": before, "after": after,
               "lift/accuracy": after["eval/accuracy"] - before["eval/accuracy"],
               "optim/skipped_total": trainer.state.skipped_steps}
    if "eval/greedy_accuracy" in after:
        summary["lift/greedy_accuracy"] = after["eval/greedy_accuracy"] - before["eval/greedy_accuracy"]
    if dist.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _last_good_text(run_dir: Path) -> str:
    """Where the last checkpoint is, and how to go on from its weights (a plain resume would diverge again)."""
    found = list_step_dirs(checkpoints_root(run_dir))
    if not found:
        return "No checkpoint was saved; lower optim.lr or check the rewards and start again"
    path = found[0][1]
    return (f"Last good checkpoint: {path}; to go on from its weights, start a new run with model={path} "
            "and a lower optim.lr")


def _say(progress: Progress | None, text: str) -> None:
    """A message for the user, above the progress bar or on stderr; said once, by rank 0."""
    if not dist.is_main():
        return
    if progress is not None and progress.enabled:
        progress.note(text)
    else:
        print(text, file=sys.stderr, flush=True)


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
