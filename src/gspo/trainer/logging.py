"""Where metrics go: ``metrics.jsonl`` always, TensorBoard when installed, a live progress bar.

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
    ("loss/clip_frac", "clip", "{:.4f}"),
    ("kl/old_new", "kl", "{:.1e}"),
    ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
)


class MetricsLogger:
    """Appends one JSON line per step and mirrors scalars to the optional sinks."""

    def __init__(self, run_dir: Path | None, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self._tb = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(run_dir / "tensorboard"))
                except ImportError:  # optional sink: metrics.jsonl is always written
                    self._tb = None

    def log(self, step: int, metrics: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.run_dir / file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = "" if file == "metrics.jsonl" else file.split(".")[0] + "/"
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(prefix + key, value, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        if self.enabled and rows:
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in row.items()}}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
