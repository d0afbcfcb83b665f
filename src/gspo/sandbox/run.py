"""``run_sandboxed``: one untrusted Python program in, one :class:`SandboxResult` out."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gspo.errors import ConfigError
from gspo.sandbox.isolation import Isolation, Plan, plan_for, tasks_of_user
from gspo.sandbox.prelude import PRELUDE, prelude_args

MIN_MEMORY_MB = 64  # below this the interpreter itself cannot start under RLIMIT_AS
# Scrubbed environment: nothing of ours leaks in; BLAS/OpenMP stay single-threaded (threads count as processes).
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class SandboxResult:
    """What an untrusted program did. ``ok`` means it exited with status 0 within the time limit."""

    ok: bool
    stdout: str
    stderr: str
    returncode: int | None  # None if timed out; negative: killed by that signal (-11 segfault, -9 SIGKILL)
    timed_out: bool
    duration_s: float
    isolation: str  # "namespace" or "basic" (see gspo.sandbox)
    output_truncated: bool  # stdout or stderr was longer than max_output_bytes


def run_sandboxed(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
                  max_processes: int = 16, max_file_mb: int = 16, max_output_bytes: int = 1_000_000,
                  isolation: Isolation = "auto") -> SandboxResult:
    """Run ``code`` as a Python program fed ``stdin``; nothing the code does makes this raise.

    ``timeout_s`` is wall-clock (CPU time is capped just above it too); ``memory_mb`` caps the address
    space; ``max_processes`` the processes and threads the code may add; ``max_file_mb`` each file it
    writes, stdout and stderr included; ``max_output_bytes`` how much of stdout/stderr is returned.
    Raises :class:`ConfigError` for a non-positive limit, or for ``isolation="namespace"`` where
    namespaces are not permitted.
    """
    _check_limits(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                  max_file_mb=max_file_mb, max_output_bytes=max_output_bytes)
    plan = plan_for(isolation)
    with tempfile.TemporaryDirectory(prefix="gspo-sandbox-", ignore_cleanup_errors=True) as outer_name:
        outer = Path(outer_name)
        work = _prepare(outer, code, stdin, plan)
        args = prelude_args(str(outer / "main.py"), memory_bytes=memory_mb * 2**20, cpu_s=math.ceil(timeout_s) + 1,
                            file_bytes=max_file_mb * 2**20,
                            nproc=tasks_of_user(os.getuid() if plan.uid is None else plan.uid) + max_processes,
                            uid=plan.uid, namespaced=bool(plan.unshare))
        argv = [*plan.unshare, plan.python, "-I", "-X", "utf8", "-c", PRELUDE, *args]
        returncode, timed_out, duration = _run(argv, outer, work, timeout_s)
        stdout, cut_out = _read_capped(outer / "stdout", max_output_bytes)
        stderr, cut_err = _read_capped(outer / "stderr", max_output_bytes)
    return SandboxResult(ok=returncode == 0 and not timed_out, stdout=stdout, stderr=stderr, returncode=returncode,
                         timed_out=timed_out, duration_s=duration, isolation=plan.name,
                         output_truncated=cut_out or cut_err)


def _check_limits(**limits: float) -> None:
    for name, value in limits.items():
        if not value > 0:
            raise ConfigError(f"run_sandboxed: {name} must be > 0, got {value!r}")
    if limits["memory_mb"] < MIN_MEMORY_MB:
        raise ConfigError(f"run_sandboxed: memory_mb={limits['memory_mb']} is too small for the Python interpreter "
                          f"itself; use at least {MIN_MEMORY_MB}")


def _prepare(outer: Path, code: str, stdin: str, plan: Plan) -> Path:
    """Lay out ``outer``: the code and stdin (readable, not writable, by the sandbox user) and ``work/``."""
    os.chmod(outer, 0o711)  # the sandbox user may pass through to work/ and read main.py, not list or write
    (outer / "main.py").write_text(code, encoding="utf-8")
    (outer / "stdin").write_text(stdin, encoding="utf-8")
    work = outer / "work"
    work.mkdir()
    if plan.uid is not None:
        os.chown(work, plan.uid, plan.uid)
    return work


def _run(argv: list[str], outer: Path, work: Path, timeout_s: float) -> tuple[int | None, bool, float]:
    """Start ``argv`` in its own session, wait up to ``timeout_s``, then kill its whole process group.

    stdout and stderr go to files, not pipes: RLIMIT_FSIZE then bounds them and nothing can deadlock.
    """
    env = {**BASE_ENV, "HOME": str(work), "TMPDIR": str(work)}
    start = time.monotonic()
    with open(outer / "stdin", "rb") as fin, open(outer / "stdout", "wb") as fout, open(outer / "stderr", "wb") as ferr:
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env,
                                start_new_session=True, close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on KeyboardInterrupt: never leave the child running
            _kill_group(proc.pid)  # and whatever the code left behind in its group
            proc.wait()
    return (None if timed_out else proc.returncode), timed_out, time.monotonic() - start


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _read_capped(path: Path, max_bytes: int) -> tuple[str, bool]:
    """The first ``max_bytes`` of a captured stream, decoded leniently, and whether it was cut."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return data[:max_bytes].decode("utf-8", errors="replace"), len(data) > max_bytes
