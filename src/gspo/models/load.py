"""Load the policy: an embedded model by name, or any local Hugging Face causal-LM directory.

Only local files are read (``local_files_only=True``), weights only from safetensors or with
``weights_only`` loading inside transformers, and ``trust_remote_code`` is never enabled: nothing
in a model directory is executed. A directory whose ``config.json`` or ``tokenizer_config.json``
maps classes to its own Python files (``auto_map``) is refused rather than silently loaded with the
built-in class of the same ``model_type``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gspo.config.load import EMBEDDED_MODELS
from gspo.errors import ModelLoadError
from gspo.models.lora import require_peft

ADAPTER_CONFIG = "adapter_config.json"  # what PEFT's save_pretrained writes for a LoRA model
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# the embedded models by the names the config accepts (gspo.config.load.EMBEDDED_MODELS, torch-free)
EMBEDDED = dict(zip(EMBEDDED_MODELS, (ASSETS / "tiny-arith", ASSETS / "tiny-moe-arith", ASSETS / "tiny-calc"), strict=True))
CODE_MAPS = ("config.json", "tokenizer_config.json")  # where transformers looks for auto_map


def quiet_transformers() -> None:
    """Silence transformers' per-file tqdm bars (loading weights, writing shards) for this process: the
    commands print their own progress, and those bars would interleave with it (gspo export, gspo sft)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model_path(name_or_path: str) -> Path:
    """The directory behind an embedded model name or a local path, with errors that say what to do."""
    if name_or_path in EMBEDDED:
        path = EMBEDDED[name_or_path]
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"the embedded model '{name_or_path}' is missing from {path}; rebuild it with "
                f"'gspo sft model={name_or_path} into_package=true'"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(EMBEDDED)
        raise ModelLoadError(
            f"model '{name_or_path}' is neither an embedded model ({names}) nor an existing directory; "
            "pass model=<local Hugging Face model directory> (nothing is downloaded)"
        )
    if path.is_dir() and (path / "adapter_config.json").exists():  # a LoRA adapter (gspo.models.lora)
        return path
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelLoadError(f"'{path}' is not a Hugging Face model directory (no config.json inside)")
    return path


def load_tokenizer(path: Path):
    """The tokenizer saved beside the model; it must define EOS, and gets pad = EOS if it has no pad."""
    from transformers import AutoTokenizer

    if (Path(path) / "adapter_config.json").exists() and not (Path(path) / "tokenizer_config.json").exists():
        path = adapter_base(path)  # a bare adapter directory: the base model's tokenizer
    refuse_custom_code(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no usable tokenizer in '{path}' ({exc}); save one with tokenizer.save_pretrained")
    return prepare_tokenizer(tokenizer, where=f"the tokenizer in '{path}'")


def prepare_tokenizer(tokenizer, *, where: str = "the tokenizer"):
    """Check that ``tokenizer`` can end a generation (EOS) and give it pad = EOS if it has no pad."""
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"{where} has no EOS token, so generation can never stop; "
            "set tokenizer.eos_token (and save it again)"
        )
    if tokenizer.pad_token_id is None:  # documented handling: pad with EOS (pad positions are masked out)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: Path, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """A causal LM from ``path``; a clear error if the directory holds another kind of model.
    ``dtype="auto"``: the dtype the weights are stored in."""
    from transformers import AutoModelForCausalLM

    if (Path(path) / "adapter_config.json").exists():  # LoRA adapter: its base with the adapter merged in
        return load_adapter_model(path, dtype=dtype, device=device)
    causal_lm_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the weights in '{path}': {exc}") from None
    return model.to(device)


def causal_lm_config(path: Path):
    """``path``'s transformers config; a clear error for custom code, a broken config or another kind of model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    refuse_custom_code(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{path}/config.json' is not a valid model config ({exc})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"'{path}' holds a '{config.model_type}' model, which is not a causal language model; "
            "gspo trains decoder-only LMs (e.g. Qwen3, Llama, Mistral, Qwen3-MoE)"
        )
    return config


def build_on_meta(path: Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM of ``path`` with no storage: parameters and buffers on the meta device, no file read
    but ``config.json``. FSDP2 shards it, then allocates only the shards (``gspo.trainer.fsdp_load``)."""
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter directory was trained on."""
    path = Path(path)
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"'{path / ADAPTER_CONFIG}' does not name its base model ({exc})") from None
    try:
        return resolve_model_path(str(base))
    except ModelLoadError as exc:
        raise ModelLoadError(f"the adapter in '{path}' was trained on '{base}', which cannot be loaded: {exc}. "
                             f"Edit base_model_name_or_path in {path / ADAPTER_CONFIG} to the base model's "
                             "directory") from None


def load_adapter_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu",
                       merge: bool = True) -> torch.nn.Module:
    """The base model with the adapter in ``path``: merged into plain weights, or a PeftModel (``merge=False``)."""
    peft = require_peft()

    base = load_model(adapter_base(path), dtype=dtype, device=device)
    model = peft.PeftModel.from_pretrained(base, str(path), is_trainable=False)
    if not merge:
        return model
    # PEFT froze the base weights; merged, they are an ordinary model again (e.g. model=<adapter> to train on)
    return model.merge_and_unload().requires_grad_(True)


def refuse_custom_code(path: Path) -> None:
    """Raise :class:`ModelLoadError` if ``path`` asks for Python code of its own (an ``auto_map`` entry)."""
    for name in CODE_MAPS:
        file = Path(path) / name
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # absent or unreadable: the loader that needs it reports that
        if isinstance(data, dict) and data.get("auto_map"):
            classes = ", ".join(sorted(map(str, data["auto_map"]))) if isinstance(data["auto_map"], dict) else "classes"
            raise ModelLoadError(
                f"'{file}' maps {classes} to Python code shipped in the model directory (auto_map); "
                "custom code is never executed (trust_remote_code is always off). Use a model whose architecture "
                "is built into transformers, or delete auto_map if its built-in model_type is the right class"
            )


def pick_device(device: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(device)
