"""Turn Ctrl-C and SIGTERM into a polite request to stop after the current step.

Usage in a training loop::

    with GracefulInterrupt() as interrupt:
        while step < steps:
            train_step()
            if interrupt.requested:
                save_checkpoint(...)
                print(f"interrupted; resume with: gspo train --resume {run_dir}")
                sys.exit(interrupt.exit_code)      # 130 after SIGINT, 143 after SIGTERM

The first SIGINT or SIGTERM only sets :attr:`GracefulInterrupt.requested`; a second SIGINT raises
``KeyboardInterrupt`` at once (the user really wants out, accepting the loss since the last
checkpoint). Previous handlers are restored on exit.

Python lets only the main thread of the main interpreter install signal handlers, so outside it the
context manager is a no-op (``active`` is False, ``requested`` stays False) and the process keeps
its default behaviour: a trainer run from a worker thread is stopped the ordinary way.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STDERR_FD = 2  # the raw descriptor: sys.stderr may be replaced by an object without one
SIGNAL_EXIT_BASE = 128  # shell convention: a process ended by signal N exits with 128 + N


class GracefulInterrupt:
    """Context manager that records SIGINT/SIGTERM instead of dying, so the trainer can checkpoint."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), *, quiet: bool = False):
        self.signals = signals
        self.quiet = quiet  # when False, say on stderr what will happen after the first signal
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self.active = False  # True while our handlers are installed
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        """The conventional exit status for the signal received (130 SIGINT, 143 SIGTERM; 0 if none)."""
        return SIGNAL_EXIT_BASE + self.signum if self.signum is not None else 0

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal would raise ValueError here; see the module docstring
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            # getsignal returns None for handlers installed from C; the default is the closest we can do.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        self.signum = signum
        if not self.quiet:
            # os.write, not print: the handler may interrupt a print to stderr (reentrant buffered I/O raises).
            message = (f"\nreceived {signal.Signals(signum).name}: finishing the current step, then saving a "
                       "checkpoint (press Ctrl-C again to stop now and lose the steps since the last one)\n")
            try:
                os.write(STDERR_FD, message.encode())
            except OSError:  # stderr closed: the flag is what matters
                pass
