"""Load the policy: an embedded model by name, or any local Hugging Face causal-LM directory.

Only local files are read (``local_files_only=True``), weights only from safetensors or with
``weights_only`` loading inside transformers, and ``trust_remote_code`` is never enabled: nothing
in a model directory is executed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gspo.errors import ModelLoadError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"tiny-arith": ASSETS / "tiny-arith", "tiny-moe": ASSETS / "tiny-moe-arith"}


def resolve_model_path(name_or_path: str) -> Path:
    """The directory behind an embedded model name or a local path, with errors that say what to do."""
    if name_or_path in EMBEDDED:
        path = EMBEDDED[name_or_path]
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"the embedded model '{name_or_path}' is missing from {path}; rebuild it with "
                f"'gspo sft model={name_or_path}'"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(EMBEDDED)
        raise ModelLoadError(
            f"model '{name_or_path}' is neither an embedded model ({names}) nor an existing directory; "
            "pass model=<local Hugging Face model directory> (nothing is downloaded)"
        )
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelLoadError(f"'{path}' is not a Hugging Face model directory (no config.json inside)")
    return path


def load_tokenizer(path: Path):
    """The tokenizer saved beside the model; it must define EOS, and gets pad = EOS if it has no pad."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no usable tokenizer in '{path}' ({exc}); save one with tokenizer.save_pretrained")
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"the tokenizer in '{path}' has no EOS token, so generation can never stop; "
            "set tokenizer.eos_token and save it again"
        )
    if tokenizer.pad_token_id is None:  # documented handling: pad with EOS (pad positions are masked out)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A causal LM from ``path``; a clear error if the directory holds another kind of model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{path}/config.json' is not a valid model config ({exc})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"'{path}' holds a '{config.model_type}' model, which is not a causal language model; "
            "gspo trains decoder-only LMs (e.g. Qwen3, Llama, Mistral, Qwen3-MoE)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the weights in '{path}': {exc}") from None
    return model.to(device)


def pick_device(device: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(device)
