"""Capture and restore every random number generator a run draws from.

The state is kept in a form ``torch.load(weights_only=True)`` accepts (tensors, lists, ints, floats,
strings, None), so saving it never requires unpickling arbitrary objects on resume. Only this
process's generators are captured: under torch.distributed each rank has its own state and only
rank 0 saves (per-rank RNG is not restored yet).
"""

from __future__ import annotations

import random
import warnings

import torch

try:  # numpy is optional: its legacy global generator is saved when it is installed
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with torch wheels in practice
    np = None


def capture_rng_state() -> dict:
    """The current state of torch (CPU and every CUDA device), Python ``random`` and numpy generators."""
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
        state["numpy"] = {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return state


def restore_rng_state(state: dict) -> None:
    """Put every generator back to ``state`` (from :func:`capture_rng_state`).

    Call it last when resuming, after building the model, optimizer and data pipeline, so nothing
    consumes random numbers between the restore and the next training step.
    """
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if "cuda" in state:
        _restore_cuda(state["cuda"])
    if "numpy" in state and np is not None:
        saved = state["numpy"]
        np.random.set_state((saved["bit_generator"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))


def _restore_cuda(states: list[torch.Tensor]) -> None:
    """Restore per-device CUDA states, warning when the device count changed since the save."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(states):
        warnings.warn(f"checkpoint holds CUDA RNG states for {len(states)} device(s) but {available} are visible; "
                      f"restoring the first {min(available, len(states))}. Sampling will not replay exactly",
                      stacklevel=3)
    for device, device_state in enumerate(states[:available]):
        torch.cuda.set_rng_state(device_state, device)
