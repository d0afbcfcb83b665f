"""LoRA adapters with PEFT: wrap the policy and merge adapters into plain weights.

Loading adapter directories belongs to :mod:`gspo.models.load` (the one owner of loading); this module
only applies adapters to a loaded model and never imports the loader.

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

from pathlib import Path

import torch

from gspo.errors import ConfigError

ALL_LINEAR = "all-linear"


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (its ``save_pretrained`` writes only the adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model: torch.nn.Module, lora, *, base_path: str | Path | None = None) -> torch.nn.Module:
    """``model`` wrapped with fresh LoRA adapters per ``lora`` (a :class:`gspo.config.schema.LoraConfig`).

    The adapters start as an exact no-op (PEFT initialises B = 0), so step 0 samples the base model.
    """
    peft = require_peft()
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
    if base_path is not None:
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


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with ``model``'s adapter merged in; ``model`` itself is left as it is."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA adapters need PEFT: pip install 'gspo[lora]'") from None
    return peft
