"""Run untrusted generated code (e.g. for a code-task reward) so that it can only ruin its own result.

Each :func:`run_sandboxed` call runs the code with ``python -I`` in a fresh process session with:

- resource limits set before the code starts: address space (``memory_mb``), CPU seconds, file size
  (which also bounds captured output), process count, open files, no core dumps;
- a wall-clock timeout that SIGKILLs the whole process group (and the PID namespace, below);
- an empty temporary working directory, removed afterwards, and a scrubbed environment;
- when started as root, the code runs as user ``nobody``: root ignores RLIMIT_NPROC and may write any
  file (see :mod:`gspo.sandbox.isolation` for how the interpreter is chosen; a warning says when
  this is impossible);
- no network. ``isolation="namespace"`` runs it under ``unshare --net --pid --ipc``: an empty network
  namespace (not even loopback is up) and a PID namespace whose processes all die with it, so a
  fork bomb or a daemonised child cannot outlive the call. Where namespaces are not permitted,
  ``"basic"`` replaces ``socket.socket`` before the code runs. That is weaker: code can still reach
  the network through ``ctypes`` syscalls, and a child calling ``setsid`` escapes the process-group
  kill. ``"auto"`` (default) picks the strongest that works; ``SandboxResult.isolation`` says which.

Not covered: reading files the sandbox user may read, and total disk use (bounded per file only).
For hostile code at scale, run rewards in a container or VM as well.

Rlimits are set by a short trusted prelude in the child (:mod:`gspo.sandbox.prelude`) rather than
in ``preexec_fn``: ``preexec_fn`` is unsafe when the parent has threads (a trainer always does), and
the prelude runs before any untrusted line, so the effect is the same.
"""

from gspo.sandbox.reward import code_output_reward, extract_code
from gspo.sandbox.run import SandboxResult, run_sandboxed

__all__ = ["SandboxResult", "code_output_reward", "extract_code", "run_sandboxed"]
