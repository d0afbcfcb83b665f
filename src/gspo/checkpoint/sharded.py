"""Sharded checkpoints (torch.distributed.checkpoint) for FSDP2 models too large to gather on one process.

Below :data:`SHARDED_MIN_PARAMS` a checkpoint holds whole weights (``model*.safetensors``, from rank 0)
and a name-keyed optimizer state (``optimizer.pt``). At or above it, under FSDP2, every process writes
its own shards of both into ``dcp/`` of the same checkpoint directory; everything else (config,
tokenizer, scheduler, RNG, trainer state, the manifest with every file's sha256, the atomic publish)
is as for a whole checkpoint, written by rank 0. Resume reads either layout with any process count
(DCP reshards on load); ``gspo export`` turns either into a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.checkpoint.save import stage_checkpoint

# Whole float32 weights + AdamW state take 16 B per parameter: at 2B parameters (32 GB) gathering them into
# rank 0's host memory and writing them from one process stops being comfortable (minutes; gpu-readiness G15).
SHARDED_MIN_PARAMS = 2_000_000_000
DCP_DIR = "dcp"  # the shards and DCP's .metadata, inside the checkpoint directory


def use_sharded_checkpoint(model: torch.nn.Module) -> bool:
    """Whether ``model``'s checkpoints are written sharded: FSDP2 and at least :data:`SHARDED_MIN_PARAMS`."""
    return dist.is_sharded(model) and sum(p.numel() for p in model.parameters()) >= SHARDED_MIN_PARAMS


def is_sharded_checkpoint(ckpt_dir: str | Path) -> bool:
    """Whether the checkpoint at ``ckpt_dir`` holds DCP shards (rather than whole safetensors weights)."""
    return (Path(ckpt_dir) / DCP_DIR / ".metadata").is_file()


def stage_sharded_weights(run_dir: str | Path, step: int, *, model: torch.nn.Module, policy: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> Path:
    """Every process writes its shards into a new temp checkpoint directory; returns it (every process).

    Rank 0 then completes and publishes it with ``save_checkpoint(..., staged=path)``.
    """
    tmp = dist.broadcast_object(str(stage_checkpoint(run_dir, step)) if dist.is_main() else None)
    dist.save_sharded_state(model, policy, optimizer, Path(tmp) / DCP_DIR)
    return Path(tmp)


def load_sharded_weights(ckpt_dir: str | Path, *, model: torch.nn.Module, policy: torch.nn.Module | None = None,
                         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into ``model`` in place, any process count."""
    dist.load_sharded_state(model, policy, optimizer, Path(ckpt_dir) / DCP_DIR)
