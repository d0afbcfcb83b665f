"""The host (CPU) heap of a training process: large tensors returned to the OS when freed, freed memory
trimmed between phases. glibc only (Linux); nothing elsewhere, or under another allocator.

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves a request of at least its mmap
threshold with a fresh ``mmap`` (given back to the OS by ``free``) and everything smaller from its heap
(kept after ``free``, reused for later requests that fit). The threshold is dynamic: it starts at 128 KiB
and rises to the size of every mmapped block freed, up to 32 MiB. A training process frees blocks of every
size from 1 to 32 MiB thousands of times per phase, so after the first step nearly every tensor comes from
the heap, and the heap fragments:

- **the sampler's KV cache grows by copies** (``gspo.rollout.native``, one block of columns at a time):
  each copy is larger than the holes the previous ones left, so the heap keeps every size it went through;
- **decode steps** allocate (rows, vocabulary) float32 buffers beside the cache's growth;
- **the update** allocates activations of each micro-batch's length, different every micro-batch.

Measured on the CPU (103M-parameter shape with the 151,936-token vocabulary, 16 responses of exactly 1,024
tokens in bfloat16, ``benchmarks/measure_memory.py``): sampling raised peak RSS by 2.1-2.3 GiB where its
live tensors held 0.35 GiB, and 0.6-1.0 GiB stayed resident after ``malloc_trim``; the run peaked at 5.26
GiB against an estimate of 4.38. With the threshold fixed at :data:`MMAP_THRESHOLD_BYTES` (4 MiB), sampling
raised it by 0.88 GiB, and the 256-token step time was unchanged (28.4 vs 28.2 s); at 1 MiB the step took
28% longer (every medium activation paid page faults). :func:`configure_heap` fixes it, at start-up.

:func:`release_freed_memory` (``malloc_trim``) gives back what the heap still holds free between the phases
of a step (sampling, the pi_old pass, the update), so each starts from its own needs.

Left alone: a threshold the user set (``MALLOC_MMAP_THRESHOLD_``), and a process whose ``malloc`` is not
glibc's (jemalloc or tcmalloc through ``LD_PRELOAD``: they have their own policies).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping

MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024  # tensors from 4 MiB up: mmapped, returned to the OS on free
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"  # glibc's own environment tunable: the user's choice is kept
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def heap_setting(environ: Mapping[str, str], *, glibc: bool) -> int | None:
    """The mmap threshold to set in bytes, or None: not glibc, the user set one, or another allocator is
    preloaded."""
    preload = environ.get("LD_PRELOAD", "")
    if not glibc or environ.get(USER_SETTING) or any(name in preload for name in OTHER_ALLOCATORS):
        return None
    return MMAP_THRESHOLD_BYTES


def configure_heap() -> int | None:
    """Apply :func:`heap_setting` to this process (``mallopt``); returns the threshold set (None: nothing).
    Idempotent; call it before the model loads (the training process and the sampler process do)."""
    value = heap_setting(os.environ, glibc=_LIBC is not None)
    if value is None or not _LIBC.mallopt(M_MMAP_THRESHOLD, value):
        return None
    return value


def release_freed_memory() -> None:
    """Return the heap memory the last phase freed to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    A few milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
