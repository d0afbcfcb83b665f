"""FSDP2 without a whole model per process: the policy and the KL reference built on the meta device, sharded,
then each process reads only its own slices of the checkpoint (as torchtitan does).

Every process builds the model from ``config.json`` alone on the meta device (no storage), wraps it and
applies FSDP2, allocates only its 1/N shards, and fills them from the safetensors files with
torch.distributed.checkpoint's Hugging Face reader (:func:`gspo.distributed.read_safetensors_slices`):
each process reads its slices, in the checkpoint's dtype, converted into its float32 shards. No process
holds the whole weights, and nothing is broadcast. The model's names are the checkpoint's, except
transformers 5's fused MoE experts, which are read from the per-expert tensors checkpoints hold
(:func:`checkpoint_targets`). The frozen KL reference is sharded the same way and read the same way; it
has no optimizer state. The only whole copy is the built-in sampler's (in ``rollout.engine_dtype``),
filled from the shards, unless that samples through the shards (``rollout.sampler_weights``,
:func:`sample_through`).

Paths that still load the whole model on every process before sharding (see docs/distributed.md): a model
passed in, LoRA (PEFT wraps loaded weights), an adapter directory as ``model``, the sampler process of
``rollout.max_staleness > 0``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.config.schema import Config
from gspo.errors import ModelLoadError
from gspo.models.load import is_adapter_dir
from gspo.moe.experts import unfused_experts
from gspo.trainer.policy import ModelCall


def loads_on_meta(config: Config, path: Path | None) -> bool:
    """Whether this run builds its policy on the meta device and reads its shards (FSDP2 under torchrun)."""
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


def load_local_slices(path: Path, device: torch.device, targets: list[tuple[torch.nn.Module, torch.nn.Module]]) -> None:
    """Allocate the shards of each meta-device ``(fsdp_root, model)`` and fill them from ``path``, each process
    reading only its own slices of the safetensors files (sharded checkpoints included).

    ``fsdp_root`` may be ``model`` itself, unsharded: it is then allocated and read whole on every process
    (the KL reference of ``loss.ref_refresh_steps > 0``, which checkpoints save whole). A collective.
    """
    with _weight_files(path) as files:
        shapes = dist.safetensors_shapes(files)
        for root, model in targets:
            root.to_empty(device=device)  # re-registers FSDP2's sharded parameters; buffers left uninitialised
            if root is model:  # a whole module (not sharded): to_empty gave tied weights their own storage
                model.tie_weights()
            dist.read_safetensors_slices(checkpoint_targets(model, shapes, path), files)
            initialise_buffers(model)


@contextlib.contextmanager
def _weight_files(path: Path):
    """A directory holding (links to) the safetensors files ``from_pretrained`` would read from ``path``:
    ``model.safetensors``, else the files its ``model.safetensors.index.json`` names. DCP's reader reads
    every ``*.safetensors`` of a directory, and a model directory may hold others (a stale single file
    beside shards, Mistral's ``consolidated.safetensors``)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    path = Path(path)
    if (path / SAFE_WEIGHTS_NAME).is_file():
        names = [SAFE_WEIGHTS_NAME]
    elif (path / SAFE_WEIGHTS_INDEX_NAME).is_file():
        names = sorted(set(json.loads((path / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
    else:
        raise ModelLoadError(f"'{path}' holds neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; the FSDP2 "
                             "sharded load reads safetensors only: save the model with save_pretrained")
    with tempfile.TemporaryDirectory(prefix="gspo-weights-") as links:
        for name in names:
            os.symlink((path / name).resolve(), Path(links) / name)
        yield links


def checkpoint_targets(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path: Path
                       ) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the tensor of ``model`` (a DTensor shard, a whole tensor, or a view) it is read into.

    ``shapes``: the checkpoint's names and shapes. A model name is read from the same checkpoint name,
    except a tied weight the checkpoint leaves out (read through the weight it is tied to) and
    transformers 5's fused experts (``experts.gate_up_proj`` / ``experts.down_proj``) where the
    checkpoint holds the per-expert tensors (Hugging Face checkpoints; gspo's own save the fused names):
    each process's shard holds whole experts (FSDP2 cuts dimension 0), and the views of those experts
    are read from their per-expert names (:func:`unfused_experts`, the names vLLM's loaders take too).
    Raises :class:`ModelLoadError` naming a tensor the checkpoint lacks or holds in another shape.
    """
    tied = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
            - {name for name, _ in model.named_parameters()})
    targets: dict[str, torch.Tensor] = {}
    for name, tensor in dist.model_state(model).items():
        if name in shapes:
            _check_shape(name, tuple(tensor.shape), shapes[name], path)
            targets[name] = tensor
        elif name not in tied:
            targets.update(_expert_targets(name, tensor, shapes, path))
    return targets


def _expert_targets(name: str, tensor: torch.Tensor, shapes: dict[str, tuple[int, ...]], path: Path
                    ) -> dict[str, torch.Tensor]:
    """A fused expert tensor's per-expert checkpoint names -> views of the experts this process holds. Checked
    for every expert on every process (one that holds none must raise too, not wait in the collective read)."""
    every = unfused_experts([(name, torch.empty(tensor.shape, device="meta"))])
    if [each for each, _ in every] == [name]:  # not a fused expert tensor: the checkpoint lacks it
        _check_shape(name, tuple(tensor.shape), None, path)
    for expert_name, view in every:
        _check_shape(expert_name, tuple(view.shape), shapes.get(expert_name), path)
    first, *rest = dist.local_offsets(tensor)
    if any(rest):
        raise ModelLoadError(f"'{name}' is sharded past its expert dimension; the load expects whole experts "
                             "per process (FSDP2 cuts dimension 0)")
    return dict(unfused_experts([(name, dist.local_tensor(tensor))], first=first))


def _check_shape(name: str, expected: tuple[int, ...], stored: tuple[int, ...] | None, path: Path) -> None:
    if stored is None:
        raise ModelLoadError(f"the checkpoint in '{path}' has no tensor '{name}', which the model built from its "
                             f"config.json needs (shape {list(expected)}): the weights do not match config.json")
    if stored != expected:
        raise ModelLoadError(f"'{name}' in '{path}' has shape {list(stored)}, the model built from its config.json "
                             f"expects {list(expected)}: the weights do not match config.json")


@torch.no_grad()
def initialise_buffers(model: torch.nn.Module) -> None:
    """The non-persistent buffers (rotary ``inv_freq``: in no checkpoint, and ``to_empty`` left them
    uninitialised) computed by transformers' own initialisation, as ``from_pretrained`` does after its
    meta-device build: ``_init_weights`` on each module owning one, with every loaded tensor flagged
    ``_is_hf_initialized`` (transformers' init functions skip flagged tensors), the flags removed after.
    Every process computes them itself (nothing is broadcast)."""
    from transformers import initialization as init

    buffers = dict(model.named_non_persistent_buffers())
    if not buffers:
        return
    loaded = [t for name, t in [*model.named_parameters(), *model.named_buffers()] if name not in buffers]
    for tensor in loaded:
        tensor._is_hf_initialized = True
    try:
        with init.guard_torch_init_functions():  # torch.nn.init's functions skip flagged tensors too
            for owner in {name.rpartition(".")[0] for name in buffers}:
                model._init_weights(model.get_submodule(owner))
    finally:
        for tensor in loaded:
            del tensor._is_hf_initialized


def materialize_engine_copy(engine, model: torch.nn.Module, device: torch.device) -> None:
    """The built-in engine's own whole copy, made from the meta-device policy: allocated on ``device``, then
    filled from the loaded shards (``sync_weights`` gathers them one tensor at a time; buffers included)."""
    copy = getattr(engine, "model", None)
    if copy is None or copy is model or not any(p.is_meta for p in copy.parameters()):
        return
    copy.to_empty(device=device)
    copy.tie_weights()  # to_empty gave tied weights their own storage
    engine.sync_weights(model)
