"""A rollout engine in its own process: sampling runs beside training instead of taking turns with it.

:class:`SubprocessEngine` spawns one sampler process (``torch.multiprocessing``, spawn start method)
holding its own copy of the policy, in the engine's dtype (one copy: the engine samples with it directly),
and an engine built there by the assembly point's factory (:func:`gspo.trainer.build.build_engine`, passed
in as a picklable callable, so this module names no trainer code). Requests and weights travel through one
FIFO queue, results through another:

- ``submit(prompts, params, row_seeds, seed)`` queues a request and returns a ticket at once;
  ``result(ticket)`` blocks for that rollout. ``generate`` is the two in a row (the plain
  :class:`~gspo.rollout.base.RolloutEngine` interface).
- ``sync_weights(model)`` queues a copy of the weights, in parts of ~256 MiB. Because weights and
  requests share one queue, a request is always sampled with the weights pushed before it, never with
  "whatever was current": which weights sample which batch is decided by the caller's order of calls
  (:mod:`gspo.trainer.pipeline` makes that order deterministic).

The sampler never outlives its parent: it is a daemon process, asks the kernel for SIGKILL when the
parent dies (``PR_SET_PDEATHSIG``, Linux), and checks that its parent is alive while it waits; an
exception in the sampler reaches the caller of ``result`` with the sampler's traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import sys
import time
import traceback
import weakref
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.multiprocessing as mp

from gspo.host_memory import configure_heap
from gspo.memory import PUSH_BYTES  # a push travels in parts of about this size (sync_weights)
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams, full_weights

POLL_S = 0.5  # how often a blocked side checks that the other one is still alive
START_TIMEOUT_S = 600.0  # importing torch + transformers on a loaded machine can take a minute
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Placement:
    """Cores and threads of one process: ``cores`` empty = leave the affinity alone."""

    cores: tuple[int, ...]
    threads: int


class SamplerDied(RuntimeError):
    """The sampler process exited or raised; the message carries its traceback when there is one."""


class SubprocessEngine:
    """A :class:`~gspo.rollout.base.RolloutEngine` whose sampling runs in a separate process.

    ``factory(model, tokenizer, path)`` builds the inner engine inside the sampler process; ``model`` is
    copied (the sampler's own weights, version 0 until the first :meth:`sync_weights`); ``tokenizer`` is
    reduced to its pad / EOS ids (all an engine needs); ``placement`` pins the sampler's cores and threads.
    ``dtype``: the sampler process holds the floating-point parameters in this dtype, the engine's (None: the
    model's), so that an engine built for that dtype samples with them directly instead of keeping a second
    copy beside them; buffers keep theirs, as an in-process engine's own copy keeps them
    (:class:`~gspo.rollout.hf.HFEngine`). Weight pushes are cast to it before they are sent.
    """

    def __init__(self, factory: Callable, model: torch.nn.Module, tokenizer, path, *,
                 placement: Placement = Placement((), 1), dtype: torch.dtype | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._requests, self._results = ctx.Queue(), ctx.Queue()
        ids = SimpleNamespace(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        weights = frozen_copy(model, dtype)
        self._dtypes = {name: t.dtype for name, t in full_weights(weights)}  # what each pushed tensor is cast to
        self._process = ctx.Process(target=_serve, name="gspo-sampler", daemon=True,
                                    args=(self._requests, self._results, factory, weights, ids, path, placement,
                                          os.getpid()))
        with _main_module_hidden():
            self._process.start()
        self._keep = [weights]  # shared-memory storage: alive until the sampler has received it
        self._tickets = 0
        self._done: dict[int, tuple[Rollout, float]] = {}
        self._info: EngineInfo | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, self._process, self._requests)

    # -- the engine interface -----------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        """The inner engine's declared properties (waits for the sampler to start)."""
        if self._info is None:
            info = self._receive(expect="ready", timeout=START_TIMEOUT_S)
            # the inner engine samples with the sampler process's own weights; from here they are a copy
            self._info = dataclasses.replace(info, weight_sync="copy") if info.weight_sync == "shared" else info
            self._keep.clear()
        return self._info

    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None, *,
                 row_seeds: list[int] | None = None, record_routing: bool = False) -> Rollout:
        if record_routing:
            raise ValueError("the sampler process does not return MoE routing records")
        seed = int(generator.initial_seed()) if generator is not None else 0
        return self.result(self.submit(prompts, params, row_seeds, seed))[0]

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Queue a copy of ``model``'s weights: every request submitted after this samples with them.

        Sent in parts of about :data:`PUSH_BYTES`, the last one marked: the queue pickles, and the sampler
        unpickles, one part at a time, so neither process holds a second serialised copy of the whole model
        (measured at the 0.6B shape with one message: trainer peak +3.8 GiB, sampler process 8.3 GiB). Each
        tensor is cast to the sampler's dtype here (the cast an in-process engine's ``copy_`` makes), which
        also halves the bytes of a float32 policy pushed to a bfloat16 sampler."""
        self._check_open()
        part, size = {}, 0
        for name, tensor in full_weights(model):
            part[name] = pack(tensor.to(self._dtypes.get(name, tensor.dtype)))  # a copy: the next update moves them
            size += part[name][1].nbytes
            if size >= PUSH_BYTES:
                self._requests.put(("weights", part, False))
                part, size = {}, 0
        self._requests.put(("weights", part, True))

    def close(self) -> None:
        """Stop the sampler process (waits briefly, then kills it). Idempotent."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    # -- asynchronous use ---------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams, row_seeds: list[int] | None,
               seed: int) -> int:
        """Queue one rollout request; returns its ticket (requests are served in order)."""
        self._check_open()
        self._tickets += 1
        self._requests.put(("generate", self._tickets, prompts, params, row_seeds, seed))
        return self._tickets

    def result(self, ticket: int) -> tuple[Rollout, float]:
        """(rollout, seconds the sampler spent generating it) for ``ticket``; blocks until it is done."""
        self.info  # noqa: B018  the start message comes first
        while ticket not in self._done:
            got, rollout, busy = self._receive(expect="rollout")
            self._done[got] = (unpack_rollout(rollout), busy)
        return self._done.pop(ticket)

    @property
    def pid(self) -> int:
        return self._process.pid

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the tensors alive in the sampler process, by dtype name, once every message queued before
        this call is served: its weights, and whatever its engine keeps between rollouts (for tests and memory
        measurements; rollouts that finish meanwhile are kept for :meth:`result`)."""
        self._check_open()
        self.info  # noqa: B018  the start message comes first
        self._requests.put(("held",))
        while True:
            kind, payload = self._next(("rollout", "held"))
            if kind == "held":
                return payload[0]
            got, rollout, busy = payload
            self._done[got] = (unpack_rollout(rollout), busy)

    def _receive(self, expect: str, timeout: float = float("inf")):
        payload = self._next((expect,), timeout)[1]
        return payload[0] if len(payload) == 1 else payload

    def _next(self, expect: tuple[str, ...], timeout: float = float("inf")) -> tuple[str, list]:
        end = time.monotonic() + timeout
        while True:
            try:
                message = self._results.get(timeout=POLL_S)
            except queue.Empty:
                if not self._process.is_alive():
                    self.close()
                    raise SamplerDied(f"the sampler process exited (code {self._process.exitcode})") from None
                if time.monotonic() > end:
                    self.close()
                    raise SamplerDied(f"the sampler process did not start within {timeout:.0f} s") from None
                continue
            kind, *payload = message
            if kind == "error":
                self.close()
                raise SamplerDied("the sampler process failed:\n" + payload[0])
            if kind not in expect:
                raise SamplerDied(f"sampler protocol: expected {' or '.join(expect)}, got {kind!r}")
            return kind, payload

    def _check_open(self) -> None:
        if self._closed:
            raise SamplerDied("the sampler process is closed")


@contextlib.contextmanager
def _main_module_hidden():
    """Spawn re-runs the parent's main script in the child unless it is hidden: a user's script without an
    ``if __name__ == "__main__"`` guard would train again in the sampler. Nothing the sampler receives
    lives in ``__main__`` (its target and factory are gspo functions), so the child needs none of it."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


# -- what crosses the queues: plain bytes ---------------------------------------------------------------
# Tensors are sent as numpy arrays (pickled bytes through the pipe), not as torch shared-memory tensors:
# torch passes each shared tensor as a file descriptor fetched from the *sender's* resource-sharer thread,
# which a busy trainer serves late; measured on the main job, a 0.3 s rollout then took 0.5-1.5 s to arrive.

def frozen_copy(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A CPU deep copy of ``model`` without gradients, floating-point parameters in ``dtype`` (None: kept), buffers
    kept; each parameter is cast on its own (no whole copy in the model's dtype first) and tied ones stay tied."""
    import copy

    memo = {}
    for param in model.parameters():
        cast = dtype if dtype is not None and param.is_floating_point() else param.dtype
        memo[id(param)] = torch.nn.Parameter(param.detach().to("cpu", cast, copy=True), requires_grad=False)
    frozen = copy.deepcopy(model, memo).cpu()
    if getattr(frozen, "_require_grads_hook", None) is not None:  # activation checkpointing's training hook: a
        frozen.disable_input_require_grads()  # local function (not picklable); sampling needs no input gradients
    return frozen


def pack(tensor: torch.Tensor) -> tuple[str, "np.ndarray"]:
    """(torch dtype name, numpy array) of a CPU copy; dtypes numpy lacks travel as same-width integers."""
    t = tensor.detach().to("cpu")
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return name, t.contiguous().numpy().copy()


def unpack(packed: tuple[str, "np.ndarray"]) -> torch.Tensor:
    name, array = packed
    t = torch.from_numpy(array)
    return t.view(getattr(torch, name)) if name in ("bfloat16", "float16") else t


def pack_rollout(rollout: Rollout) -> dict:
    if rollout.routing is not None:
        raise ValueError("the sampler process does not return MoE routing records")
    out = {}
    for f in dataclasses.fields(rollout):
        value = getattr(rollout, f.name)
        out[f.name] = ("tensor", pack(value)) if isinstance(value, torch.Tensor) else ("plain", value)
    return out


def unpack_rollout(data: dict) -> Rollout:
    return Rollout(**{k: unpack(v) if kind == "tensor" else v for k, (kind, v) in data.items()})


def live_tensor_bytes() -> dict[str, int]:
    """Bytes of this process's tensors that Python references, by dtype name (each storage counted once)."""
    import gc

    seen, held = set(), {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # type(): no proxy's __getattr__
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            name = str(obj.dtype).removeprefix("torch.")
            held[name] = held.get(name, 0) + storage.nbytes()
    return held


def _stop(process, requests) -> None:
    """Ask the sampler to stop, then make sure it has (also run at garbage collection and exit)."""
    if process.is_alive():
        try:
            requests.put(("close",))
        except (OSError, ValueError):
            pass
        process.join(CLOSE_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join(CLOSE_TIMEOUT_S)


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent exits, however it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the liveness checks below still apply
        pass


def place(placement: Placement) -> None:
    """Pin this process to ``placement.cores`` (where the OS allows it) and set torch's thread count."""
    if placement.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, placement.cores)
    torch.set_num_threads(max(1, placement.threads))


def _serve(requests, results, factory, model, tokenizer, path, placement: Placement, parent: int) -> None:
    """The sampler process: build the engine, then serve weights and requests in queue order."""
    _die_with_parent()
    configure_heap()  # its decode steps and KV-cache growth, as in the trainer (gspo.host_memory)
    try:
        place(placement)
        engine = factory(model, tokenizer, path)
        targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        results.put(("ready", engine.info))
    except BaseException:  # noqa: BLE001  reported to the trainer, which raises it
        results.put(("error", traceback.format_exc()))
        return
    ticket = None
    try:
        while True:
            try:
                message = requests.get(timeout=POLL_S)
            except queue.Empty:
                if os.getppid() != parent:  # orphaned (no PR_SET_PDEATHSIG here): stop
                    return
                continue
            kind = message[0]
            if kind == "close":
                return
            if kind == "held":
                results.put(("held", live_tensor_bytes()))
                continue
            if kind == "weights":  # one part of a push; the last one completes it
                with torch.no_grad():
                    for name, packed in message[1].items():
                        targets[name].copy_(unpack(packed))
                if message[2]:
                    engine.sync_weights(model)  # engines with their own copy (e.g. bfloat16) refresh it
                continue
            _, ticket, prompts, params, row_seeds, seed = message
            start = time.perf_counter()
            rollout = engine.generate(prompts, params, torch.Generator().manual_seed(seed), row_seeds=row_seeds)
            results.put(("rollout", ticket, pack_rollout(rollout), time.perf_counter() - start))
    except BaseException:  # noqa: BLE001
        results.put(("error", f"(request {ticket})\n" + traceback.format_exc()))
    finally:
        engine.close()
