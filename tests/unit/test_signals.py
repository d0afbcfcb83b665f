"""GracefulInterrupt: signals become a flag, a second Ctrl-C aborts, handlers are restored."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from gspo.signals import GracefulInterrupt


def deliver(signum: int, interrupt: GracefulInterrupt | None = None) -> None:
    """Send ``signum`` to this process and wait until Python has run the handler."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5.0
    while interrupt is not None and not interrupt.requested and time.monotonic() < deadline:
        time.sleep(0.001)  # handlers run between bytecodes of the main thread


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_sets_flag_and_exit_code(signum, code):
    with GracefulInterrupt(quiet=True) as interrupt:
        assert interrupt.active and not interrupt.requested and interrupt.exit_code == 0
        deliver(signum, interrupt)
        assert interrupt.requested and interrupt.signum == signum and interrupt.exit_code == code


def test_second_sigint_raises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with GracefulInterrupt(quiet=True) as interrupt:
            deliver(signal.SIGTERM, interrupt)
            deliver(signal.SIGINT)
            time.sleep(1.0)  # the KeyboardInterrupt arrives during this wait
    assert interrupt.signum == signal.SIGTERM  # the first signal decides the exit code


def test_previous_handlers_restored():
    seen = []
    sigint_before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with GracefulInterrupt(quiet=True):
            assert signal.getsignal(signal.SIGTERM) is not previous
        deliver(signal.SIGTERM)
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_message_tells_what_happens_next(capfd):
    with GracefulInterrupt() as interrupt:
        deliver(signal.SIGTERM, interrupt)
    assert "received SIGTERM" in capfd.readouterr().err


def test_noop_outside_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def worker():
        with GracefulInterrupt() as interrupt:
            result["active"] = interrupt.active
            result["handler"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == {"active": False, "handler": before}
