"""The policy's weights as vLLM loads them: Hugging Face checkpoint names (MoE experts per expert), LoRA
merged in.

LoRA runs push the merged weights (base + B·A·alpha/r), not the adapters. vLLM can serve adapters
(``enable_lora`` and a ``LoRARequest`` per request), but then every rollout batch needs a new adapter id
loaded from disk, the sampler runs vLLM's LoRA kernels (slower than a plain matmul, and a second code
path whose log-probabilities differ from the merged model's), and adapters over fused MoE expert
weights are not supported. Merged weights keep one engine path for every run: the same reload call,
full sampling speed, exactly the function the trainer differentiates. The cost is moving the whole
model per sync instead of the adapters only (a copy in memory in-process; one safetensors write to a
RAM-backed directory for the server on a CPU).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from gspo.moe.experts import unfused_experts
from gspo.rollout.base import full_weights

LORA_PREFIX = "base_model.model."  # what PEFT prepends to every name of the model it wraps


def engine_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, whole detached tensor) for every parameter the engine needs, LoRA adapters merged, one
    tensor at a time and each cast to ``dtype`` (the engine's; None = as held) as it is yielded.

    Streaming: nothing is collected, so a sync holds at most one extra tensor (one FSDP2-gathered or
    LoRA-merged parameter, or its cast) beside the model; a float32 policy pushes bfloat16 bytes to a
    bfloat16 engine (half the transfer, no per-tensor dtype conversion on vLLM's side). Tied parameters
    are yielded under each of their names, the second right after the first (``lm_head.weight`` beside
    ``model.embed_tokens.weight``): vLLM's CPU backend keeps a packed copy of the LM head, which is only
    refreshed when its own name is loaded (measured: without it a log-prob error of 0.1 after a sync).
    Buffers are left out (vLLM computes its own rotary tables). Under FSDP2 this is a collective: every
    process must consume the whole iterator, in step. Tensors may alias the training parameters (same
    dtype): consume them before the next optimizer step.
    """
    return _engine_weights(model, dtype, full_weights)


def engine_weight_metadata(model: torch.nn.Module, dtype: torch.dtype | None = None
                           ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of exactly what :func:`engine_weights` yields, in its order, without gathering,
    merging or copying anything (shapes of meta tensors; an FSDP2 parameter's global shape)."""
    return [(name, t.dtype, tuple(t.shape)) for name, t in _engine_weights(model, dtype, _meta_weights)]


def _engine_weights(model: torch.nn.Module, dtype: torch.dtype | None, source) -> Iterator[tuple[str, torch.Tensor]]:
    model = getattr(model, "module", model)
    if hasattr(model, "peft_config"):
        weights = _merged_lora_weights(model, source)
    else:
        names = {name for name, _ in model.named_parameters()}
        weights = ((name, tensor.detach()) for name, tensor in source(model) if name in names)
    aliases = _tied_aliases(model)
    for name, tensor in weights:
        tensor = tensor if dtype is None else tensor.to(dtype)
        for each in [name, *aliases.get(name, ())]:
            yield from unfused_experts([(each, tensor)])


def _meta_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`full_weights`' names with shape-only (meta) tensors of their whole shapes."""
    for kind in ("named_parameters", "named_buffers"):
        for name, tensor in getattr(model, kind)():
            yield name.replace("_fsdp_wrapped_module.", ""), torch.empty(tensor.shape, dtype=tensor.dtype,
                                                                          device="meta")


def _tied_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """First HF name -> its other names, for every parameter registered under more than one name."""
    canonical = {id(p): _hf_name(name) for name, p in model.named_parameters()}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias, first = _hf_name(name), canonical[id(p)]
        if alias != first:
            aliases.setdefault(first, []).append(alias)
    return aliases


def _hf_name(name: str) -> str:
    """A (possibly PEFT-wrapped) parameter name as the Hugging Face checkpoint spells it."""
    return name.replace(".base_layer.", ".").replace("_fsdp_wrapped_module.", "").removeprefix(LORA_PREFIX)


def _merged_lora_weights(model: torch.nn.Module, source=full_weights) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base weight of a PEFT model with its active adapter's delta added (the model is untouched),
    one at a time; on meta tensors (``source=_meta_weights``) only the names and shapes."""
    modules = dict(model.named_modules())
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in source(model):
        if "lora_" in name or name not in parameters:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):  # a LoRA-wrapped layer: base + its delta
            layer = modules[owner.removesuffix(".base_layer")]
            if leaf == "weight" and adapter in getattr(layer, "lora_A", {}) and not tensor.is_meta:
                with torch.no_grad():
                    tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            owner = owner.removesuffix(".base_layer")
        yield f"{owner}.{leaf}".removeprefix(LORA_PREFIX), tensor.detach()


def shm_directory() -> Path:
    """A fresh directory in RAM (``/dev/shm`` where it exists) for the server's weight files."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="gspo-vllm-weights-", dir=root))


def write_safetensors(weights: list[tuple[str, torch.Tensor]], directory: Path) -> Path:
    """Write ``weights`` as ``directory/model.safetensors`` (atomically: vLLM never reads half a file)."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in weights:  # safetensors refuses tensors that share memory (tied weights, expert views)
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        tensors[name] = tensor.contiguous() if whole and tensor.data_ptr() not in seen else tensor.clone()
        seen.add(tensor.data_ptr())
    partial = directory / "model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, directory / "model.safetensors")
    return directory
