"""The trusted prelude a sandboxed child runs before the untrusted code.

Run as ``python -I -X utf8 -c PRELUDE <code_path> <limits...>`` (argv documented in
:func:`prelude_args`). It sets the resource limits, reads the code, drops to the sandbox user, blocks
sockets when no network namespace isolates it, then executes the code as ``__main__`` in a fresh
module, with tracebacks that show ``main.py`` lines and hide the prelude frame. In a namespace it
re-arms "die with the parent" (dropping the uid disarms unshare's ``--kill-child``): killing
``unshare`` then kills the namespace's first process, and with it every process in the namespace.
"""

from __future__ import annotations

PRELUDE = r"""
import linecache, os, resource, sys, traceback, types
code_path, mem, cpu, fsize, nproc, nofile, uid, namespaced = sys.argv[1:9]
for kind, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, int(mem)), (resource.RLIMIT_FSIZE, int(fsize)),
                    (resource.RLIMIT_NPROC, int(nproc)), (resource.RLIMIT_NOFILE, int(nofile))):
    resource.setrlimit(kind, (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
with open(code_path, encoding="utf-8") as f:
    source = f.read()
if int(uid) >= 0:
    os.setgroups([]); os.setgid(int(uid)); os.setuid(int(uid))
if namespaced == "1":  # changing uid cleared unshare's --kill-child; without it a setsid() child outlives a kill
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # prctl(PR_SET_PDEATHSIG, SIGKILL): die with unshare, taking the PID namespace
else:  # no network namespace: the weaker guard, see gspo.sandbox
    import _socket, socket
    def _no_network(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the gspo sandbox")
    class _NoSocket(socket.socket):
        __init__ = _no_network
    socket.socket = socket.SocketType = _socket.socket = _NoSocket
    socket.socketpair = socket.create_connection = socket.create_server = socket.fromfd = _no_network
linecache.cache["main.py"] = (len(source), None, source.splitlines(True), "main.py")
main = types.ModuleType("__main__"); main.__file__ = "main.py"
sys.modules["__main__"] = main; sys.argv = ["main.py"]
del linecache, os, resource, types, code_path, mem, cpu, fsize, nproc, nofile, uid, namespaced, kind, value, f
try:
    exec(compile(source, "main.py", "exec"), main.__dict__)
except SystemExit:
    raise
except BaseException as exc:
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    sys.exit(1)
"""

OPEN_FILES_LIMIT = 256  # RLIMIT_NOFILE: plenty for a test program, bounds descriptor exhaustion


def prelude_args(code_path: str, *, memory_bytes: int, cpu_s: int, file_bytes: int, nproc: int,
                 uid: int | None, namespaced: bool) -> list[str]:
    """The argv after ``-c PRELUDE``: code path, RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, ..."""
    return [code_path, str(memory_bytes), str(cpu_s), str(file_bytes), str(nproc), str(OPEN_FILES_LIMIT),
            str(-1 if uid is None else uid), "1" if namespaced else "0"]
