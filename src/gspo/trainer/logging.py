"""Where metrics go: ``metrics.jsonl`` always, tracker sinks (TensorBoard, W&B, MLflow), a live progress bar.

Only the main process (rank 0) writes; the trainer builds a :class:`MetricsLogger` there and a
silent one elsewhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Columns of the live progress bar: (metric key, label, format).
PROGRESS_COLUMNS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/accuracy", "acc", "{:.2f}"),
    ("agent/tool_call_ok_frac", "tool_ok", "{:.2f}"),  # agents: only agent tasks log these
    ("agent/turns_mean", "turns", "{:.2f}"),
    ("loss/clip_frac", "clip", "{:.4f}"),
    ("kl/old_new", "kl", "{:.1e}"),
    ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
    ("loss/sft", "loss", "{:.3f}"),  # gspo sft's supervised steps (gspo.sft.SFT_LOSS_KEY)
)


class MetricsLogger:
    """Writes each step's metrics to ``metrics.jsonl`` and to the run's tracker sinks (:mod:`gspo.trainer.sinks`).

    ``tensorboard``: add TensorBoard when it is installed (the historical default); ``trackers``: sinks
    that must be used (tensorboard, wandb, mlflow); ``run_config``: the resolved config, attached to
    W&B and MLflow runs.
    """

    def __init__(self, run_dir: Path | None, *, tensorboard: bool = True, enabled: bool = True,
                 trackers: list[str] = (), project: str = "gspo", run_config: dict | None = None) -> None:
        from gspo.trainer.sinks import JsonlSink, build_sinks

        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.sinks: list = []
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.sinks = [JsonlSink(run_dir / "metrics.jsonl"),
                          *build_sinks(run_dir, list(trackers), tensorboard=tensorboard, project=project,
                                       run_config=run_config)]

    def resume_at(self, step: int) -> None:
        """A resume from the checkpoint of ``step``: trackers that can forget the redone steps do
        (TensorBoard); ``metrics.jsonl`` is cut by :func:`drop_records_after`."""
        for sink in self.sinks:
            if hasattr(sink, "resume_at"):
                sink.resume_at(step)

    def log(self, step: int, metrics: dict[str, Any], file: str = "metrics.jsonl") -> None:
        """``file``: another JSON-lines file of the run; trackers then see the keys under ``<file stem>/``."""
        if not self.enabled:
            return
        if file == "metrics.jsonl":
            for sink in self.sinks:
                sink.log(step, metrics)
            return
        from gspo.trainer.sinks import JsonlSink

        JsonlSink(self.run_dir / file).log(step, metrics)
        prefix = file.split(".")[0] + "/"
        for sink in self.sinks[1:]:
            sink.log(step, {prefix + k: v for k, v in metrics.items()})

    def samples(self, step: int, rows: list[dict]) -> None:
        if self.enabled and rows:
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in row.items()}}) + "\n")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = self.sinks[:1]  # metrics.jsonl needs no closing and stays usable


def drop_records_after(run_dir: Path, step: int, files: tuple[str, ...] = ("metrics.jsonl", "samples.jsonl")) -> None:
    """On resume from ``step``: forget the records of later steps (they are redone) and lines torn by a kill."""
    from gspo.checkpoint._fs import replace_file_atomic

    for name in files:
        path = run_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the process was killed while writing this line
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        replace_file_atomic(path, "".join(kept).encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def progress_text(metrics: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in PROGRESS_COLUMNS:
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    return "  ".join(parts)
