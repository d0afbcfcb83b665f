"""LoRA adapters with PEFT: wrap the policy, load adapter directories, merge them into plain weights.

With ``lora.rank > 0`` the policy is a ``peft.PeftModel``: the base weights are frozen and only the
adapters train (the optimizer sees only parameters that require gradients). The wrapper forwards
``get_decoder``, ``get_output_embeddings`` and ``config`` to the transformers model inside, whose
linear layers PEFT replaced in place, so the rollout engine and the chunked log-probabilities work on
it unchanged. The KL reference is the same module inside ``disable_adapter()`` (the base model; no
second copy in memory).

A checkpoint of a LoRA run holds the adapter (``adapter_model.safetensors`` + ``adapter_config.json``,
whose ``base_model_name_or_path`` is the absolute base directory). :func:`load_adapter_model` turns
such a directory back into a model: the base with the adapter merged in, or still wrapped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gspo.errors import ConfigError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (its ``save_pretrained`` writes only the adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def apply_lora(model: torch.nn.Module, lora, *, base_path: str | Path) -> torch.nn.Module:
    """``model`` wrapped with fresh LoRA adapters per ``lora`` (a :class:`gspo.config.schema.LoraConfig`).

    The adapters start as an exact no-op (PEFT initialises B = 0), so step 0 samples the base model.
    """
    peft = _require_peft()
    targets = list(lora.target_modules)
    parameters = None
    if targets == [ALL_LINEAR]:
        targets, parameters = all_linear_targets(model)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, target_parameters=parameters or None, bias="none")
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ConfigError(f"lora.target_modules={','.join(targets)}: {exc}") from None
    # An absolute path: AutoModelForCausalLM.from_pretrained(adapter checkpoint) finds the base from anywhere.
    wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return wrapped


def all_linear_targets(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """What ``all-linear`` adapts: (names of linear layers but the LM head, names of fused 3-D expert weights).

    Resolved here rather than by PEFT, whose ``"all-linear"`` on transformers-v5 MoE models also wraps each
    router's weight: routers stay as they are (adapting them would move expert choices, and Routing
    Replay hooks the router module itself).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and module is not head})
    experts = sorted({name.rpartition(".")[2] for name, param in model.named_parameters() if param.ndim == 3})
    return linear, experts


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter directory was trained on."""
    path = Path(path)
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"'{path / ADAPTER_CONFIG}' does not name its base model ({exc})") from None
    from gspo.models.load import resolve_model_path

    try:
        return resolve_model_path(str(base))
    except ModelLoadError as exc:
        raise ModelLoadError(f"the adapter in '{path}' was trained on '{base}', which cannot be loaded: {exc}. "
                             f"Edit base_model_name_or_path in {path / ADAPTER_CONFIG} to the base model's "
                             "directory") from None


def load_adapter_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu",
                       merge: bool = True) -> torch.nn.Module:
    """The base model with the adapter in ``path``: merged into plain weights, or a PeftModel (``merge=False``)."""
    peft = _require_peft()
    from gspo.models.load import load_model

    base = load_model(adapter_base(path), dtype=dtype, device=device)
    model = peft.PeftModel.from_pretrained(base, str(path), is_trainable=False)
    if not merge:
        return model
    # PEFT froze the base weights; merged, they are an ordinary model again (e.g. model=<adapter> to train on)
    return model.merge_and_unload().requires_grad_(True)


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with ``model``'s adapter merged in; ``model`` itself is left as it is."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA adapters need PEFT: pip install 'gspo[lora]'") from None
    return peft
