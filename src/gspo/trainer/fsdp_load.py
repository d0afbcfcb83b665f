"""FSDP2 without a whole model per process: the policy and the KL reference built on the meta device, sharded,
then loaded from rank 0 (as torchtitan, TRL and verl do).

Every process builds the model from ``config.json`` alone on the meta device (no storage), wraps it and
applies FSDP2, and allocates only its 1/N shards. Rank 0 alone reads the weights (``from_pretrained`` into
its host memory, so transformers' own key conversions apply, MoE expert fusing included) and scatters them
(:func:`gspo.distributed.materialize_shards`). The frozen KL reference is sharded the same way and filled
from the same read; it has no optimizer state. A process other than rank 0 never reads the checkpoint,
and the only whole copy it builds is the built-in sampler's (in ``rollout.engine_dtype``), filled from the shards,
unless that samples through the shards (``rollout.sampler_weights``, :func:`sample_through`).

Paths that still load the whole model on every process before sharding (see docs/distributed.md): a model
passed in, LoRA (PEFT wraps loaded weights), an adapter directory as ``model``, the sampler process of
``rollout.max_staleness > 0``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.config.schema import Config
from gspo.models.load import is_adapter_dir, load_model
from gspo.trainer.policy import ModelCall


def loads_on_meta(config: Config, path: Path | None) -> bool:
    """Whether this run builds its policy on the meta device and loads it from rank 0 (FSDP2 under torchrun)."""
    return (dist.is_initialized() and config.distributed.strategy == "fsdp" and path is not None
            and not config.lora.rank and not is_adapter_dir(path) and not config.rollout.max_staleness)


def shard_reference(reference: torch.nn.Module, param_dtype: torch.dtype | None) -> torch.nn.Module:
    """The frozen KL reference sharded by FSDP2 like the policy (each decoder layer, then a
    :class:`ModelCall` root, which it returns: call ``root(fn, *args)`` for ``fn(reference, *args)``)."""
    return dist.shard_for_training(ModelCall(reference), param_dtype=param_dtype)


def call_reference(root: torch.nn.Module | None, reference: torch.nn.Module, fn, *args, **kwargs):
    """``fn(reference, *args)``; a sharded reference runs it through its FSDP2 root (:func:`shard_reference`),
    which gathers the root's parameters (embeddings, head) around the call and frees them after (no backward)."""
    if root is None:
        return fn(reference, *args, **kwargs)
    out = root(fn, *args, **kwargs)
    root.reshard()
    return out


def sample_through(root: torch.nn.Module, fn):
    """``fn()`` (the built-in sampler's whole rollout) inside the FSDP2 ``root``'s call, autograd off, then the
    root resharded: the root's parameters (embeddings, head) stay gathered for the rollout, each decoder layer's
    are gathered for each of its forwards and freed after (``rollout.sampler_weights=shards``). No whole copy.
    Not under inference mode: FSDP2 reuses its gather buffers in training, and inference tensors cannot be
    written outside it. A collective: every process samples in lockstep (:class:`gspo.rollout.hf.Lockstep`)."""
    with torch.no_grad():
        out = root(run=fn)
    root.reshard()
    return out


def load_from_rank0(path: Path, device: torch.device, targets: list[tuple[torch.nn.Module, torch.nn.Module]]) -> None:
    """Allocate the shards of each meta-device ``(fsdp_root, model)`` and fill them from rank 0's read of ``path``.

    ``fsdp_root`` may be ``model`` itself, unsharded: it is then allocated whole on every process (the KL
    reference of ``loss.ref_refresh_steps > 0``, which checkpoints save whole). Rank 0 holds the whole
    weights in host memory once, for every target together; the other processes hold only their shards.
    A collective.
    """
    state, buffers = {}, {}
    if dist.is_main():  # in the checkpoint's own dtype: a bf16 checkpoint takes half the host memory, and
        # its values widen into the float32 shards exactly as a float32 load would widen them
        whole = load_model(path, dtype="auto", device="cpu")
        state, buffers = whole.state_dict(), dict(whole.named_buffers())
        del whole
    for root, model in targets:
        dist.materialize_shards(root, model, device, state, buffers)
        if root is model:  # a whole module (not sharded): to_empty gave tied weights their own storage
            model.tie_weights()


def materialize_engine_copy(engine, model: torch.nn.Module, device: torch.device) -> None:
    """The built-in engine's own whole copy, made from the meta-device policy: allocated on ``device``, then
    filled from the loaded shards (``sync_weights`` gathers them one tensor at a time; buffers included)."""
    copy = getattr(engine, "model", None)
    if copy is None or copy is model or not any(p.is_meta for p in copy.parameters()):
        return
    copy.to_empty(device=device)
    copy.tie_weights()  # to_empty gave tied weights their own storage
    engine.sync_weights(model)
