"""Crash-safe checkpoints: atomic save, verified load, automatic fallback to the last good one.

A run can be killed at any instant and lose only the steps since its last checkpoint:

- :func:`save_checkpoint` writes into a temp directory, fsyncs everything, writes a manifest of
  sizes and sha256 digests last, and publishes with one ``rename``; old checkpoints are rotated out
  only after the new one is durable.
- :func:`find_latest_checkpoint` returns the newest checkpoint whose manifest verifies, warning about
  and skipping partial or corrupt ones.
- :func:`load_checkpoint` loads weights from safetensors and optimizer/scheduler/RNG states with
  ``torch.load(weights_only=True)`` only: nothing in a checkpoint is ever executed.

The trainer calls, on resume: ``path = find_latest_checkpoint(run_dir)``, then
``state = load_checkpoint(path, model=..., optimizer=..., scheduler=...)``, and last
``restore_rng_state(state["rng"])``; every N steps (rank 0 only): ``save_checkpoint(run_dir, step, ...)``.
"""

from gspo.checkpoint.load import CorruptCheckpointWarning, find_latest_checkpoint, load_checkpoint
from gspo.checkpoint.manifest import FORMAT_VERSION, checkpoints_root, verify_checkpoint
from gspo.checkpoint.rng import capture_rng_state, restore_rng_state
from gspo.checkpoint.save import save_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "CorruptCheckpointWarning",
    "capture_rng_state",
    "checkpoints_root",
    "find_latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]
