"""Peak host-memory growth of the FSDP2 sharded load, per process (2 gloo processes, CPU).

Builds the ~103M-parameter Qwen3 shape of ``measure_memory.py`` (float32 on disk, tied 151,936-token
embedding), then in each of 2 processes: the model on the meta device, FSDP2, and the load
(``gspo.trainer.fsdp_load``). Prints each rank's peak RSS (``VmHWM``, reset first) above its RSS before the build.
Run: ``python benchmarks/measure_fsdp_load.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from measure_memory import build  # noqa: E402


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


class _AnonPeak(threading.Thread):
    """The peak of RssAnon (the process's own memory; RSS also counts the mapped safetensors pages), sampled."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status_mib("RssAnon"))
            time.sleep(0.002)


def _worker(rank: int, port: int, model_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gspo import distributed as dist
    from gspo.models.load import build_on_meta
    from gspo.trainer import fsdp_load

    dist.maybe_init_distributed()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (a spawned child starts with its parent's)
        f.write("5")
    before, anon_before, sampler = _rss_mib(), _status_mib("RssAnon"), _AnonPeak()
    sampler.start()
    model = build_on_meta(Path(model_dir))
    root = dist.shard_for_training(model)
    load = getattr(fsdp_load, "load_local_slices", None) or fsdp_load.load_from_rank0  # this tree's loader
    load(Path(model_dir), torch.device("cpu"), [(root, model)])
    peak, sampler.running = _status_mib("VmHWM"), False
    sampler.join()
    shards = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
    dist.barrier()
    print(f"rank {rank}: {load.__name__}: over the build and load, peak RSS +{peak - before:.0f} MiB, peak "
          f"anonymous +{sampler.peak - anon_before:.0f} MiB (its float32 shards: {shards:.0f} MiB)", flush=True)
    dist.shutdown()


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        build(Path(directory))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(port, directory), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
