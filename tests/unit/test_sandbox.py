"""Sandbox: output captured; runaways, memory bombs, crashes, fork bombs and network use only cost a result."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from gspo.errors import ConfigError, RewardError
from gspo.sandbox import code_output_reward, extract_code, run_sandboxed
from gspo.sandbox.isolation import NOBODY_UID, sandbox_user, unshare_prefix

ISOLATIONS = ["basic"] + (["namespace"] if unshare_prefix() else [])


def test_output_captured_and_stdin_fed():
    result = run_sandboxed("import sys\nname = input()\nprint('hi', name)\nprint('oops', file=sys.stderr)",
                           stdin="ada\n")
    assert result.ok and result.returncode == 0 and not result.timed_out
    assert (result.stdout, result.stderr) == ("hi ada\n", "oops\n")


def test_exception_reported_with_the_programs_own_line():
    result = run_sandboxed("x = 1\n1 / 0\n")
    assert not result.ok and result.returncode == 1
    assert 'File "main.py", line 2' in result.stderr and "ZeroDivisionError" in result.stderr
    assert "<string>" not in result.stderr  # the prelude's frame is hidden


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_sandboxed("while True:\n    pass", timeout_s=0.5)
    assert result.timed_out and not result.ok and result.returncode is None
    assert time.monotonic() - start < 5.0


def test_memory_bomb_is_stopped():
    result = run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))", memory_mb=128)
    assert not result.ok and not result.timed_out and "MemoryError" in result.stderr


def test_segfault_is_a_failed_result():
    result = run_sandboxed("import ctypes\nctypes.string_at(0)")
    assert not result.ok and result.returncode == -11  # SIGSEGV


def test_fork_bomb_is_contained():
    if os.geteuid() == 0 and sandbox_user()[0] is None:
        pytest.skip("running as root without a usable unprivileged user: RLIMIT_NPROC would not apply")
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        print('fork refused', flush=True)\n        os._exit(0)")
    result = run_sandboxed(code, timeout_s=3.0, max_processes=8)
    assert "fork refused" in result.stdout  # the limit, not the timeout, stopped it


def processes_running(cmdline: bytes) -> int:
    count = 0
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            count += path.read_bytes() == cmdline
        except OSError:
            pass
    return count


@pytest.mark.skipif("namespace" not in ISOLATIONS, reason="needs PID namespaces (unshare)")
def test_detached_children_die_with_the_namespace():
    code = ("import os, time\nos.setsid()\nif os.fork() == 0:\n    os.setsid()\n"
            "    os.execv('/bin/sleep', ['sleep', '31.4159'])\ntime.sleep(30)")
    result = run_sandboxed(code, timeout_s=1.0)
    assert result.timed_out
    deadline = time.monotonic() + 3.0
    while processes_running(b"sleep\x0031.4159\x00") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_running(b"sleep\x0031.4159\x00") == 0


def test_output_is_bounded():
    result = run_sandboxed("print('x' * 10**7)", max_output_bytes=1000, max_file_mb=1)
    assert not result.ok and result.output_truncated and len(result.stdout) == 1000
    assert "File too large" in result.stderr


def test_runs_in_empty_temp_dir_with_scrubbed_env(monkeypatch):
    monkeypatch.setenv("GSPO_SECRET_TOKEN", "do-not-leak")
    code = "import os\nprint(os.listdir('.'))\nprint('GSPO_SECRET_TOKEN' in os.environ)\nprint(os.getcwd())"
    result = run_sandboxed(code)
    listing, leaked, cwd = result.stdout.splitlines()
    assert (listing, leaked) == ("[]", "False") and not Path(cwd).exists()  # removed afterwards


def test_cannot_write_outside_its_directory_when_started_as_root(tmp_path):
    if os.geteuid() != 0 or sandbox_user()[0] != NOBODY_UID:
        pytest.skip("only meaningful when the sandbox drops root to nobody")
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "owned"
    result = run_sandboxed(f"open({str(target)!r}, 'w')")
    assert "PermissionError" in result.stderr and not target.exists()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_network_is_blocked(isolation):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=2)\n"
                "    print('connected')\nexcept OSError as exc:\n    print('blocked', type(exc).__name__)") % port
        result = run_sandboxed(code, isolation=isolation)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody reached the listener
    assert result.ok and result.stdout.startswith("blocked") and result.isolation == isolation


def test_invalid_limits_are_config_errors():
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(ConfigError, match="isolation must be"):
        run_sandboxed("pass", isolation="docker")


def test_extract_code_takes_last_fenced_block():
    completion = "First try:\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\n"
    assert extract_code(completion) == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"


def test_code_output_reward_scores_fraction_of_tests():
    completion = "```python\nn = int(input())\nprint(n * n)\n```"
    tests = [("3\n", "9\n"), ("4\n", "16  \n"), ("5\n", "24\n")]  # trailing spaces ignored; last is wrong
    assert code_output_reward("square it", completion, tests=tests) == pytest.approx(2 / 3)
    assert code_output_reward("square it", "```python\nwhile True: pass\n```", tests=tests[:1], timeout_s=0.5) == 0.0
    with pytest.raises(RewardError, match="no tests"):
        code_output_reward("p", completion, tests=[])
