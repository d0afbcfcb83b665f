"""Which isolation this machine allows, probed once per process.

Two independent questions:

- Namespaces: can ``unshare`` (util-linux) give the child empty network, PID and IPC namespaces?
  As root directly; as another user through a user namespace (``--user --map-root-user``), where
  the kernel allows unprivileged ones.
- User: when started as root, which interpreter still works after dropping to ``nobody``? Root
  ignores RLIMIT_NPROC and may write any file, so dropping matters more than using the very same
  interpreter: the first of ``sys.executable`` and the system ``python3`` with the same major.minor
  version that ``nobody`` can run is used (a pyenv or venv under ``/root`` is not readable by it).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gspo.errors import ConfigError

Isolation = Literal["auto", "namespace", "basic"]
NOBODY_UID = 65534  # the conventional unprivileged "nobody" user and group
NAMESPACE_FLAGS = ("--net", "--pid", "--ipc", "--fork", "--kill-child")  # --kill-child: the PID ns dies with us
USERNS_FLAGS = ("--user", "--map-root-user")  # lets a non-root user create the namespaces above
PROBE_TIMEOUT_S = 20.0  # generous: the first probe may wait for a cold interpreter start
PROBE_CODE = "import ctypes, json, math, socket, sys; print(*sys.version_info[:2])"  # C extensions readable?


@dataclass(frozen=True)
class Plan:
    """How to launch a sandboxed child."""

    unshare: tuple[str, ...]  # command prefix entering the namespaces; () for none
    uid: int | None  # the user the code runs as; None keeps the current one
    python: str  # interpreter to run

    @property
    def name(self) -> str:
        return "namespace" if self.unshare else "basic"


def plan_for(isolation: Isolation) -> Plan:
    """The launch plan for ``isolation`` ("auto": the strongest that works here)."""
    if isolation not in ("auto", "namespace", "basic"):
        raise ConfigError(f"run_sandboxed: isolation must be 'auto', 'namespace' or 'basic', got {isolation!r}")
    uid, python = sandbox_user()
    prefix = () if isolation == "basic" else unshare_prefix()
    if isolation == "namespace" and not prefix:
        raise ConfigError("run_sandboxed: isolation='namespace' needs `unshare` (util-linux) and the right to create "
                          "namespaces (root, CAP_SYS_ADMIN or unprivileged user namespaces); "
                          "use isolation='auto' to fall back to the weaker socket blocking")
    return Plan(unshare=prefix, uid=uid, python=python)


@functools.lru_cache(maxsize=None)
def unshare_prefix() -> tuple[str, ...]:
    """The ``unshare ... --`` prefix that works here, or () when namespaces are not permitted."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (NAMESPACE_FLAGS, USERNS_FLAGS + NAMESPACE_FLAGS):
        prefix = (unshare, *flags, "--")
        if _probe([*prefix, sys.executable, "-I", "-c", "pass"]) is not None:
            return prefix
    return ()


@functools.lru_cache(maxsize=None)
def sandbox_user() -> tuple[int | None, str]:
    """``(uid, interpreter)``: ``nobody`` and an interpreter it can run when we are root, else ours."""
    if os.geteuid() != 0:
        return None, sys.executable
    version = f"{sys.version_info[0]} {sys.version_info[1]}"
    for python in _interpreters():
        if _probe([python, "-I", "-c", PROBE_CODE], user=NOBODY_UID) == version:
            return NOBODY_UID, python
    warnings.warn(f"gspo sandbox: no Python {sys.version_info[0]}.{sys.version_info[1]} is usable by user nobody "
                  f"(uid {NOBODY_UID}), e.g. because it is installed under /root; untrusted code will run as root, "
                  "able to write any file, and RLIMIT_NPROC does not bind root (a fork bomb is stopped only by the "
                  "timeout). Install Python where other users can read it (/usr, /opt) or run as a non-root user",
                  RuntimeWarning, stacklevel=2)
    return None, sys.executable


def _interpreters() -> list[str]:
    """Candidate interpreters, ours first, without duplicates."""
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable, shutil.which(minor), f"/usr/bin/{minor}", shutil.which("python3"), "/usr/bin/python3"]
    seen, unique = set(), []
    for path in filter(None, candidates):
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(real):
            seen.add(real)
            unique.append(path)
    return unique


def _probe(argv: list[str], *, user: int | None = None) -> str | None:
    """Stripped stdout of ``argv`` if it exits 0, else None. ``user``: run as that uid and gid."""
    ids = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, cwd="/",
                              env={"PATH": "/usr/bin:/bin"}, **ids)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tasks_of_user(uid: int) -> int:
    """How many tasks (threads) ``uid`` runs now: RLIMIT_NPROC counts them all, not only the sandbox's."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue  # the process ended while we looked
        uid_match = re.search(r"^Uid:\s+(\d+)", text, re.M)
        threads = re.search(r"^Threads:\s+(\d+)", text, re.M)
        if uid_match and threads and int(uid_match.group(1)) == uid:
            count += int(threads.group(1))
    return count
