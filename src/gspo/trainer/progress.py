"""The live progress bar: step, reward, accuracy, clip fraction, KL and tokens/s at a glance."""

from __future__ import annotations

import sys

from gspo.trainer.logging import progress_text


class Progress:
    """A rich progress bar when enabled (and rich is installed); plain lines otherwise."""

    def __init__(self, total: int, *, enabled: bool = True, console=None) -> None:
        self.total = total
        self.enabled = enabled
        self._bar = None
        self._console = console
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._console = console or Console(stderr=True)
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                console=self._console, transient=False,
            )
            self._task = self._bar.add_task("train", total=total, stats="")

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=progress_text(metrics))

    def note(self, text: str) -> None:
        """A line above the bar (or on stderr without one)."""
        if self._console is not None:
            self._console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)
