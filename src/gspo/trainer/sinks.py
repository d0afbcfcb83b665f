"""Metric sinks behind one small interface: JSON lines (always), TensorBoard, Weights & Biases, MLflow.

A sink takes ``log(step, metrics)`` with scalar metrics whose keys are namespaced with ``/``
(``loss/clip_frac``), and ``close()``. The trackers are optional dependencies, imported only when a
run asks for them (``log.trackers=tensorboard,wandb,mlflow``; validation checks they are installed).
W&B and MLflow read their usual environment (``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

MLFLOW_PARAM_CHARS = 250  # MLflow rejects longer parameter values on some servers; config values are cut to this


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per call, ``{"step": N, **metrics}``, appended to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars to TensorBoard event files under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = str(run_dir / "tensorboard")
        self.writer = SummaryWriter(self.directory)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def resume_at(self, step: int) -> None:
        """A resume from the checkpoint of ``step``: the later steps are redone, so TensorBoard is told to
        drop their earlier events (``purge_step``) instead of drawing both runs' values."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(self.directory, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run named after the run directory, with the resolved config attached."""

    def __init__(self, run_dir: Path, project: str, run_config: dict | None) -> None:
        import wandb

        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=run_config or {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run in experiment ``project``, with the resolved config as (flattened) parameters."""

    def __init__(self, run_dir: Path, project: str, run_config: dict | None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=run_dir.name)
        if run_config:
            mlflow.log_params({k: str(v)[:MLFLOW_PARAM_CHARS] for k, v in flatten(run_config).items()})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics(scalars(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def build_sinks(run_dir: Path, trackers: list[str], *, tensorboard: bool, project: str,
                run_config: dict | None) -> list[Sink]:
    """The tracker sinks a run asked for (not the JSON lines one, which the logger always keeps).

    Trackers listed in ``trackers`` must import; ``tensorboard=True`` adds TensorBoard only when installed.
    """
    names = list(dict.fromkeys(trackers))
    if tensorboard and "tensorboard" not in names:
        try:
            import tensorboard as _  # noqa: F401  (optional sink: metrics.jsonl is always written)

            names.insert(0, "tensorboard")
        except ImportError:
            pass
    sinks: list[Sink] = []
    for name in names:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir))
        elif name == "wandb":
            sinks.append(WandbSink(run_dir, project, run_config))
        elif name == "mlflow":
            sinks.append(MlflowSink(run_dir, project, run_config))
        else:
            from gspo.errors import ConfigError

            raise ConfigError(f"log.trackers={name!r} is not one of tensorboard, wandb, mlflow")
    return sinks


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among ``metrics`` (trackers take scalars only)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
