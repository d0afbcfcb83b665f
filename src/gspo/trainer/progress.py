"""The live progress display: step, elapsed, ETA, reward, accuracy, clip fraction, KL and tokens/s.

On a terminal, a rich bar fitted to the width: step/total, elapsed and ETA are never shortened; the
metrics drop from the lowest-priority end (tokens/s, then KL, ...) and the bar shrinks, instead of
rich ellipsizing every column at 80 columns. Elsewhere (a file, ``nohup``, ``| tee``) one plain line
every ``every`` steps. Notes (the held-out accuracy, the lift and the run directory, the resume
command) are printed as plain text, never cut to the width.
"""

from __future__ import annotations

import sys
import time

from gspo.trainer.logging import PROGRESS_COLUMNS

MIN_BAR = 6  # below this a bar says nothing; it goes before step, times or the first metrics do
TIME_WIDTH = 8  # h:mm:ss, with room for 10+ hours


class Progress:
    """Progress of a run of ``total`` steps (see the module docstring); silent unless ``enabled``.

    ``console``: a rich Console (default: stderr); ``every``: steps between plain lines when it is not
    a terminal.
    """

    def __init__(self, total: int, *, enabled: bool = True, console=None, every: int = 10,
                 label: str = "train") -> None:
        self.total = total
        self.label = label  # the bar's first column: train, or sft for gspo sft
        self.enabled = enabled
        self.every = max(1, int(every))
        self._bar = None
        self._console = console
        self._start = time.monotonic()
        self._start_step: int | None = None
        if not enabled:
            return
        from rich.console import Console

        self._console = console or Console(stderr=True)
        if self._console.is_terminal:
            self._bar = self._rich_bar()

    def _rich_bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar_column = BarColumn(bar_width=MIN_BAR)
        bar = RichProgress(
            TextColumn(f"[bold]{self.label}"), self._bar_column, MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
            console=self._console, transient=False,
        )
        self._task = bar.add_task("train", total=self.total, stats="")
        self._fit({})
        return bar

    def __enter__(self) -> "Progress":
        self._start = time.monotonic()
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self._start_step is None:  # a resumed run starts past 0: rate from the steps done here
            self._start_step = step - 1
            if self._bar is not None and self._start_step > 0:  # not "N steps in one step's time"
                self._bar.reset(self._task, completed=self._start_step)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=self._fit(metrics))
        elif step % self.every == 0 or step == self.total:
            self._plain(self.plain_line(step, metrics))

    def plain_line(self, step: int, metrics: dict) -> str:
        """``step 12/200  elapsed 0:00:12  eta 0:03:10  reward 0.412  acc 0.41  clip 0.0012  ...``."""
        elapsed = time.monotonic() - self._start
        done = step - (self._start_step if self._start_step is not None else 0)
        eta = _clock(elapsed / done * (self.total - step)) if done > 0 else "-:--:--"
        return "  ".join([f"step {step}/{self.total}", f"elapsed {_clock(elapsed)}", f"eta {eta}",
                          *_metric_parts(metrics)])

    def note(self, text: str) -> None:
        """A line above the bar (or on stderr without one), printed whole whatever the width."""
        if self._bar is not None:  # above the live bar; soft_wrap: no line breaks, no cropping
            self._console.print(text, soft_wrap=True, markup=False, highlight=False, emoji=False)
        elif self._console is not None:
            self._plain(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _plain(self, text: str) -> None:
        print(text, file=self._console.file, flush=True)

    def _fit(self, metrics: dict) -> str:
        """The metrics text that fits beside step, elapsed and ETA; sizes the bar to the rest."""
        digits = len(str(self.total))
        fixed = len(self.label) + (2 * digits + 1) + TIME_WIDTH + len("eta") + TIME_WIDTH + 6  # 6 one-space gaps
        room = self._console.width - fixed - 1  # the bar's own gap
        parts = _metric_parts(metrics)
        while parts and len("  ".join(parts)) + MIN_BAR > room:
            parts.pop()  # lowest priority last
        stats = "  ".join(parts)
        self._bar_column.bar_width = max(MIN_BAR, min(40, room - len(stats)))
        return stats


def _metric_parts(metrics: dict) -> list[str]:
    """``reward 0.412``, ``acc 0.41``, ... in the progress columns' priority order."""
    parts = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in PROGRESS_COLUMNS if key in metrics]
    if "pipeline/wait_s" in metrics:  # rollout.max_staleness > 0: after reward, acc and clip
        parts.insert(min(3, len(parts)), _pipeline_part(metrics))
    return parts


def _pipeline_part(metrics: dict) -> str:
    """``s/t/wait 0.81/1.23/0.00s``: sampler busy, trainer busy, trainer waiting for the sampler (seconds
    of the last step). The larger busy side is the bottleneck; a wait near 0 means sampling is hidden."""
    return (f"s/t/wait {metrics.get('pipeline/sampler_busy_s', 0.0):.2f}/"
            f"{metrics.get('pipeline/trainer_busy_s', 0.0):.2f}/{metrics['pipeline/wait_s']:.2f}s")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
