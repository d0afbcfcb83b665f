"""Keep the host process as gspo set it up while vLLM runs inside it.

vLLM's in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) treats the process as its own: at
start it seeds the global RNGs, binds memory to a NUMA node (``MPOL_BIND``), replaces
``torch.set_num_threads`` with a function that only logs a warning, and exports environment variables
(``LD_PRELOAD`` among them, which every subprocess gspo starts afterwards would inherit); every
``generate`` draws from torch's global RNG even when each request has its own seed. gspo's bitwise
reproducibility (a resumed run draws the same numbers) and its ``cpu_threads`` setting must not depend
on whether vLLM ran, so every call into vLLM runs inside :func:`preserved_host_state`, which puts all
of it back afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from typing import Iterator

import torch

_KEEP_ENV_PREFIX = "VLLM_"  # vLLM's own variables (e.g. VLLM_DIST_IDENT) are read again at shutdown


@contextlib.contextmanager
def preserved_host_state() -> Iterator[None]:
    """Run the block, then restore RNGs, the current CUDA device, torch threads, CPU affinity, NUMA policy
    and environment."""
    import numpy as np

    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None  # vLLM's worker sets its own
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    policy = _get_mempolicy()
    environ = dict(os.environ)
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if cuda_device is not None and torch.cuda.current_device() != cuda_device:
            torch.cuda.set_device(cuda_device)
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            set_num_threads(threads)
        if affinity is not None and os.sched_getaffinity(0) != affinity:
            os.sched_setaffinity(0, affinity)
        if policy is not None and _get_mempolicy() != policy:
            _set_mempolicy(*policy)
        for key in set(os.environ) - set(environ):
            if not key.startswith(_KEEP_ENV_PREFIX):
                del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


_MAX_NODES = 1024  # bits of the node mask passed to get/set_mempolicy


def _libnuma():
    for name in ("libnuma.so.1", "libnuma.so"):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    return None


def _get_mempolicy() -> tuple[int, tuple[int, ...]] | None:
    """(mode, node mask words) of this thread's NUMA memory policy; None where libnuma is missing."""
    lib = _libnuma()
    if lib is None:
        return None
    mode, mask = ctypes.c_int(), (ctypes.c_ulong * (_MAX_NODES // 64))()
    if lib.get_mempolicy(ctypes.byref(mode), mask, ctypes.c_ulong(_MAX_NODES), None, ctypes.c_ulong(0)) != 0:
        return None
    return mode.value, tuple(mask)


def _set_mempolicy(mode: int, mask: tuple[int, ...]) -> None:
    lib = _libnuma()
    words = (ctypes.c_ulong * len(mask))(*mask)
    # MPOL_DEFAULT (0) takes no node mask; the others the one read by _get_mempolicy.
    if mode == 0:
        lib.set_mempolicy(ctypes.c_int(0), None, ctypes.c_ulong(0))
    else:
        lib.set_mempolicy(ctypes.c_int(mode), words, ctypes.c_ulong(_MAX_NODES))


def host_state() -> dict:
    """What :func:`preserved_host_state` protects, as comparable values (for tests and diagnostics)."""
    import numpy as np

    return {
        "torch_rng": torch.get_rng_state().tolist(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].tolist(),
        "threads": torch.get_num_threads(),
        "set_num_threads": torch.set_num_threads.__module__,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mempolicy": _get_mempolicy(),
        "environ": {k: v for k, v in os.environ.items() if not k.startswith(_KEEP_ENV_PREFIX)},
    }
