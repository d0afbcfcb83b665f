"""Start several data-parallel processes with torchrun (``gspo train --nproc N``)."""

from __future__ import annotations

import subprocess
import sys

from gspo.distributed import maybe_init_distributed

__all__ = ["maybe_init_distributed", "relaunch_with_torchrun"]


def relaunch_with_torchrun(nproc: int, gspo_args: list[str]) -> int:
    """Run ``python -m torch.distributed.run --nproc-per-node N -m gspo <args>`` and wait for it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "gspo", *gspo_args]
    return subprocess.call(command)
