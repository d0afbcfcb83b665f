"""The one module that imports torch.distributed.

Everything else asks this module for its rank, world size, reductions and model wrapping. Without
an initialised process group (a plain ``gspo train``) every function here is the single-process
identity, so the trainer has one code path. Launch several processes with torchrun
(``torchrun --nproc-per-node N -m gspo train ...`` or ``gspo train --nproc N``): gloo on CPUs; on GPUs
one process group with NCCL for CUDA tensors and gloo for CPU tensors and pickled objects (metrics,
rewards and counts live on the CPU), DDP by default, FSDP2 (``fully_shard``) with
``distributed.strategy=fsdp``.

Gradient scale: each process's loss is its share of the global loss (the losses take global
normalisers), so the global gradient is the *sum* of the per-process gradients. DDP and FSDP average
gradients over processes, so the trainer multiplies each loss by :func:`world_size` before backward
(:func:`gradient_scale`).
"""

from __future__ import annotations

import contextlib
import io
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# gloo collectives on a loaded CPU can be slow; a generous timeout avoids spurious failures while a
# rank is still sampling, and a hung rank still fails eventually.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def is_initialized() -> bool:
    """True when this process is one of a torchrun launch and has joined its process group.

    Decided from the launcher, not from ``dist.is_initialized()`` alone: in-process vLLM initialises a
    world-size-1 group of its own in a plain ``gspo train``, which must not make gspo wrap DDP or reduce
    metrics over vLLM's group.
    """
    return launched_by_torchrun() and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes logs, plots and checkpoints (rank 0)."""
    return rank() == 0


def gradient_scale() -> float:
    """Factor on each process's loss so that averaged gradients equal the global sum (see module doc)."""
    return float(world_size())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every process (in place, returned for chaining)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def total_over_processes(count: int) -> int:
    """``count`` summed over every process (a collective: every process must call it)."""
    if not is_initialized():
        return count
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.long)))  # (1,) on the CPU: gloo


def mean_over_processes(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over processes; a key that a process lacks counts as 0 there (such as
    ``reward/<name>/none_frac``, reported only where a reward returned None).

    Right for means over equal shares (every process holds as many responses); loss terms, counts and
    token-weighted means need their own reductions (:func:`gather_scalars`).
    """
    if not is_initialized():
        return metrics
    keys = sorted(set().union(*all_gather_object(sorted(metrics))))  # the same list, in the same order, everywhere
    metrics = {k: metrics.get(k, 0.0) for k in keys}
    if not keys:
        return metrics
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    all_reduce_sum(values)
    return {k: float(v) / world_size() for k, v in zip(keys, values)}


def gather_scalars(metrics: dict[str, float | torch.Tensor]) -> list[dict[str, float]]:
    """Every process's scalar ``metrics``, in rank order (every process must pass the same keys)."""
    if not is_initialized():
        return [{k: float(v) for k, v in metrics.items()}]
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)  # (K,) on the CPU: gloo
    out = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(out, values)
    return [dict(zip(keys, row.tolist())) for row in out]


def concat_over_processes(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along ``dim`` in rank order (same shape on every process)."""
    if not is_initialized():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=dim)


def mean_of_all(values: list[float]) -> float:
    """The mean of every process's ``values`` together (a process may have none); 0.0 when all are empty."""
    parts = gather_scalars({"sum": sum(values), "count": len(values)})
    count = sum(p["count"] for p in parts)
    return sum(p["sum"] for p in parts) / count if count else 0.0


def all_gather_object(obj) -> list:
    """``obj`` from every process, in rank order (pickled; for small batches of Python objects).

    Tensors travel as bytes over the CPU side of the group and arrive on this process's device: CPU
    tensors stay on the CPU, CUDA tensors (any rank's ``cuda:r``) land on this process's GPU, never on
    another process's (plain pickling would restore them on ``cuda:r``).
    """
    if not is_initialized():
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out = [None] * world_size()
    dist.all_gather_object(out, buffer.getvalue())  # bytes: a CPU object
    return [torch.load(io.BytesIO(data), map_location=_local_storage, weights_only=False) for data in out]


def _local_storage(storage, location: str):
    """``torch.load`` map_location: CUDA storages (any rank's ``cuda:r``) move to this process's GPU, the
    rest stay on the CPU. The CUDA branch has not run on a GPU yet (the CPU suite cannot reach it)."""
    if location.startswith("cuda"):
        return storage.cuda(torch.cuda.current_device())
    return storage


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_group_backend(cuda: bool) -> str:
    """The backend string of the run's process group: gloo on CPUs; on GPUs NCCL for CUDA tensors *and*
    gloo for CPU tensors and objects (metrics, rewards and counts are CPU tensors: an NCCL-only group
    fails on them with "No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def maybe_init_distributed() -> None:
    """Join the process group when launched by torchrun (:func:`process_group_backend`)."""
    if not launched_by_torchrun() or is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=process_group_backend(cuda), timeout=PROCESS_GROUP_TIMEOUT)


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def wrap_for_training(module: torch.nn.Module, strategy: str, *, param_dtype: torch.dtype | None = None
                      ) -> torch.nn.Module:
    """DDP (replicated weights) or FSDP2 (sharded) around ``module``; the module itself alone.

    ``param_dtype`` (FSDP2): the dtype the gathered parameters compute in (e.g. bfloat16), see
    :func:`shard_for_training`; DDP ignores it (autocast casts there).
    """
    if not is_initialized():
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(module, device_ids=device_ids)
    if strategy == "fsdp":
        return shard_for_training(module, param_dtype=param_dtype)
    raise ValueError(f"unknown distributed strategy {strategy!r}: use ddp or fsdp")


def no_sync(module: torch.nn.Module):
    """Skip the gradient all-reduce for a micro-batch that is not the last of its optimizer step (DDP).

    FSDP2 keeps syncing: skipping would keep every unsharded float32 gradient until the last micro-batch
    (a whole model's worth per process); a reduce-scatter per micro-batch keeps only the shards.
    """
    if hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a possibly sharded (DTensor) parameter; collective under FSDP2."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def copy_full_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy ``source``'s (possibly FSDP-sharded) parameters into the unsharded ``target``, in place.

    Under FSDP2 every process must call this (gathering a sharded parameter is a collective).
    """
    targets = dict(target.named_parameters())
    for name, param in source.named_parameters():
        targets[name.removeprefix("_fsdp_wrapped_module.")].copy_(full_tensor(param))


def full_optimizer_state(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state as one process would hold it (FSDP2: gathered; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def load_full_optimizer_state(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a gathered optimizer state into a sharded (or plain) optimizer.

    Under torch.distributed only rank 0's ``state`` is read (the others pass ``{}``): it is broadcast
    tensor by tensor and each process keeps its shard.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=is_initialized()))


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (each becomes one FSDP2 unit)."""
    for sub in module.modules():
        layers = getattr(sub, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    return []


# --- FSDP2: sharding, and whole state dicts in and out of DTensor parameters ---


def shard_for_training(module: torch.nn.Module, *, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) around each decoder layer and the whole ``module``, in place.

    Each process keeps 1/N of every parameter (float32: the master weights the optimizer steps) and
    gathers one layer at a time for compute. ``param_dtype`` (e.g. bfloat16): the gathered copy is cast
    to it, halving gather traffic and compute memory, while gradients are reduced in float32
    (``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``); None or float32 computes in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = None if param_dtype in (None, torch.float32) else param_dtype
    policy = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32 if mixed else None)
    for layer in _decoder_layers(module):
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def load_full_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Scatter a whole state dict into ``module``'s (possibly sharded) parameters; a collective.

    Only rank 0's ``state`` is read (the others pass ``{}``): rank 0 alone holds the whole weights in host
    memory, and each tensor is broadcast and cut into the local shard. Keys are ``module``'s own; a
    tied weight may be absent (it is loaded through the weight it is tied to).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=is_initialized(), strict=False))


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as it is held, without gathering: FSDP2 parameters as DTensors (this process's
    shards), the others whole; the tensors share the module's storage."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def local_offsets(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where this process's shard of ``tensor`` starts in the whole tensor (zeros for a whole tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return (0,) * tensor.dim()
    return tuple(tensor.__create_chunk_list__()[0].offsets)  # the chunk DCP itself reads and writes


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage); a whole tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the ``*.safetensors`` files of ``path`` (their headers only)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    metadata = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    return {name: tuple(meta.size) for name, meta in metadata.items()}


def read_safetensors_slices(targets: dict[str, torch.Tensor], path) -> None:
    """Fill every tensor of ``targets`` (a checkpoint tensor's name -> a DTensor, a whole tensor, or a view of
    either's local storage) from the safetensors files of ``path``, in place and converted to its dtype.

    Each process reads only its own slices (torch.distributed.checkpoint's ``HuggingFaceStorageReader``:
    ``safe_open(...).get_slice`` per read item, one slice in memory at a time): a DTensor reads its local
    shard, a plain tensor the whole named tensor. Processes may pass different names (e.g. the experts
    each one holds). A collective when a process group is initialised.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)))


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s whole state dict on rank 0's CPU (``{}`` elsewhere); a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_state(module: torch.nn.Module, policy: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                       path) -> None:
    """Every process writes its shards of ``module``'s weights and the optimizer state to ``path`` (DCP).

    ``optimizer`` was built over ``policy``'s parameters (its state is keyed by ``policy``'s names).
    torch.distributed.checkpoint writes one file per process plus ``.metadata``; the directory must be
    on a filesystem every process sees. A collective.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(policy, optimizer)
    dcp.save(state, checkpoint_id=path)


def load_sharded_state(module: torch.nn.Module, policy: torch.nn.Module | None,
                       optimizer: torch.optim.Optimizer | None, path) -> None:
    """Load a :func:`save_sharded_state` directory into ``module`` (and the optimizer), in place.

    DCP reshards on load: any process count reads what any other wrote, a single process (no process
    group, e.g. ``gspo export``) included.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(policy, optimizer)  # initialised, so DCP has targets
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(policy, optimizer, state["optimizer"])


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process (pickled)."""
    return all_gather_object(obj)[0]
