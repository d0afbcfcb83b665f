"""The host (CPU) heap of a training process: freed memory kept and reused, never handed back and faulted
in again. glibc only (Linux); nothing elsewhere, or under another allocator.

PyTorch's CPU allocator is the C library's ``malloc``. By default glibc serves every request above its mmap
threshold (128 KiB rising to at most 32 MiB) with a fresh ``mmap`` that ``free`` unmaps, and gives the heap's
free top back to the OS past its trim threshold. Every such block is faulted in again, page by page (each
4 KiB page zeroed by the kernel), the next time a tensor of that size is allocated, and a training step
allocates the same shapes over and over: the weights' compute-dtype casts, the activations of every
micro-batch, the LM head's (tokens, vocabulary) logits, the gradients, the decode steps' (rows, vocabulary)
buffers.

Measured on the development CPU (2-core AMD EPYC with AVX512-BF16), ``benchmarks/measure_memory.py``'s
103M-parameter shape (151,936 vocabulary), 16 responses of 1,024 tokens in bfloat16, two steps, two cases
at a time: with the mmap threshold fixed at 4 MiB (this module's earlier setting, chosen for the peak) the
run took 46 million page faults, 90 s of kernel time (``ru_stime``) and 436 s; with every block from the
heap, 2.2 million faults, 5 s and 343 s (-21%). Qwen3-0.6B's shape, 16 x 128 tokens, one step after a
warm-up: 9.2 million faults, 32 s of kernel time, 84 s before; 1.0 million, 6 s, 65 s (-23%) with the heap
kept but trimmed between phases. :func:`configure_heap` sets this at start-up: no mmapped blocks
(``M_MMAP_MAX`` 0) and no trimming (``M_TRIM_THRESHOLD`` -1, which glibc reads as "never"; its largest int,
2 GiB, the earlier setting, was passed by the 0.6B shape's 2.2 GB of gradients freed at the heap's top).

Not trimmed between phases either (``malloc_trim``, the earlier practice): on a 2-core Intel Xeon with AMX a
page fault costs ~11 us of kernel time, and the trims' 1.5 million faults per 128-token 0.6B step took
16-20 s of its 47-65 s. Without them the heap grows to the largest phase's needs over the first steps and
stays there: four such steps after a warm-up took 41.4, 40.5, 42.3 and 44.0 s, at 11.8, 11.8, 12.4 and 12.4
GiB peak RSS (13.7 GiB with the trims), with 500, 153,000 and 33 page faults in the last three.

The price is fragmentation: memory freed between longer-lived tensors stays resident until a request fits
it (PyTorch asks for 64-byte aligned blocks, which a hole of exactly the same size cannot serve), so a
phase peaks above its live tensors, by 0.22-0.87x the estimate's largest transient in the runs measured
(0.87: the 0.6B shape at 1,024 tokens without trims between phases; the 103M shape at 1,024 tokens in
float32: 6.20 GB against 4.59 with the 4 MiB threshold, 1.28x the estimate; the 0.6B shape at 128 tokens:
12.3 against 11.3 GiB). The trainer therefore keeps the heap only
where the estimate plus 0.9x its transient fits (:func:`gspo.memory_plan.heap_reuse_fits`), and applies
the 4 MiB setting (:data:`LEAN_SETTINGS`) otherwise, where :func:`release_freed_memory` (``malloc_trim``)
gives every free page back between the phases of a step (sampling, the pi_old pass, the update).

Left alone: a process where the user set any of glibc's malloc tunables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``glibc.malloc.*`` in
``GLIBC_TUNABLES``; e.g. ``MALLOC_MMAP_THRESHOLD_=4194304`` gives the leaner, slower behaviour back), and a
process whose ``malloc`` is not glibc's (jemalloc or tcmalloc through ``LD_PRELOAD``: they have their own
policies).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
# the heap's free top is never given back on free: -1 is "never" to mallopt(3) (its largest int, the earlier
# setting, is 2 GiB: the 0.6B shape's gradients passed it)
HEAP_SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
# the leaner setting, for runs whose estimate leaves no room for the heap's holes: blocks of 4 MiB and more
# mmapped and given back on free (page faults every time they are allocated again)
LEAN_SETTINGS = {M_MMAP_THRESHOLD: 4 * 1024 * 1024}
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()
_KEPT = False  # configure_heap kept the heap for reuse in this process (release_freed_memory then does nothing)


def heap_setting(environ: Mapping[str, str], *, glibc: bool, reuse: bool = True) -> dict[int, int] | None:
    """The ``mallopt`` settings to apply ({parameter: value}): :data:`HEAP_SETTINGS`, or with ``reuse`` False
    :data:`LEAN_SETTINGS`; None: not glibc, the user set a malloc tunable, or another allocator is preloaded."""
    preload = environ.get("LD_PRELOAD", "")
    user = any(environ.get(name) for name in USER_SETTINGS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
    if not glibc or user or any(name in preload for name in OTHER_ALLOCATORS):
        return None
    return dict(HEAP_SETTINGS if reuse else LEAN_SETTINGS)


def heap_reusable() -> bool:
    """Whether :func:`configure_heap` can keep this process's heap for reuse (glibc, no malloc tunable set by the
    user, no other allocator preloaded): the memory plan then leaves room for it where it can."""
    return heap_setting(os.environ, glibc=_LIBC is not None) is not None


def configure_heap(reuse: bool = True) -> dict[int, int] | None:
    """Apply :func:`heap_setting` to this process (``mallopt``); returns the settings applied (None: nothing).
    Idempotent; call it before the model loads (the training process and the sampler process do). The trainer
    passes ``reuse`` from its memory plan (:func:`gspo.memory_plan.heap_reuse_fits`): a run whose estimate
    leaves no room for the heap's holes keeps the lean setting."""
    global _KEPT
    settings = heap_setting(os.environ, glibc=_LIBC is not None, reuse=reuse)
    if settings is None or not all(_LIBC.mallopt(param, value) for param, value in settings.items()):
        return None
    _KEPT = settings == HEAP_SETTINGS
    return settings


def release_freed_memory() -> None:
    """Between the phases of a step: return the heap memory the last phase freed to the OS (glibc's
    ``malloc_trim``, a few milliseconds), unless :func:`configure_heap` keeps the heap for reuse; elsewhere
    nothing."""
    if _LIBC is not None and not _KEPT:
        _LIBC.malloc_trim(0)
