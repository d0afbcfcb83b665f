"""``gspo export RUN_OR_CHECKPOINT OUT_DIR [merge=true]``: a checkpoint as a plain Hugging Face model.

The output loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer``, and
with any tool that reads Hugging Face directories:

- a full fine-tuning checkpoint is re-saved in transformers' standard layout (checkpoints keep the
  in-memory names, e.g. fused MoE experts; the export writes the original per-expert names);
- a LoRA checkpoint is merged into its base model (``merge=true``, the default), or copied as an
  adapter (``merge=false``: ``adapter_model.safetensors`` + ``adapter_config.json``, for PEFT).

RUN_OR_CHECKPOINT is a run directory (its newest checkpoint that verifies), a checkpoint directory
(verified against its manifest; whole or sharded, see :mod:`gspo.checkpoint.sharded`), or any local
model or adapter directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gspo.cli_args import Command, Option, parse, render_help
from gspo.errors import CheckpointError, ConfigError

EXPORT = Command(
    "export", "a Hugging Face model directory (LoRA adapters merged) that from_pretrained loads",
    positionals=(("RUN_OR_CHECKPOINT", "a run directory (its newest valid checkpoint), a checkpoint, or a "
                                       "model/adapter directory"),
                 ("OUT_DIR", "the new model directory (must not exist, or be empty)")),
    required=2,
    options=(Option("merge", "true", "merge a LoRA adapter into its base model; false copies the adapter for PEFT",
                    kind="bool"),),
    description="Writes a Hugging Face model directory (weights in safetensors, config, tokenizer) that\n"
                "AutoModelForCausalLM / AutoTokenizer.from_pretrained load.",
)


def export_model(source: str | Path, out_dir: str | Path, *, merge: bool = True) -> Path:
    """Export the checkpoint behind ``source`` to ``out_dir`` (see the module docstring); returns ``out_dir``."""
    from gspo.models.load import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir
    from gspo.models.load import load_model

    checkpoint = resolve_checkpoint(Path(source))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export target '{out}' exists and is not empty; choose a new directory")
    tokenizer = _tokenizer(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    if is_adapter_dir(checkpoint) and not merge:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(checkpoint / name, out / name)
    else:
        model = _sharded_model(checkpoint) or load_model(checkpoint)  # adapters come back merged (gspo.models.lora)
        # transformers reverts on save only the renamings it applied on load, and a checkpoint stored with the
        # in-memory names (fused MoE experts) needed none: forget that record so the architecture's standard
        # layout is written, whatever layout the checkpoint used.
        vars(model).pop("_weight_conversions", None)
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from gspo.checkpoint._fs import respect_umask

    respect_umask(out)  # weights written through tempfile are 0600 otherwise
    return out


def _sharded_model(checkpoint: Path):
    """The model of a sharded (DCP) checkpoint, built from its config.json and loaded in one process; None
    for any other directory."""
    from gspo.checkpoint.sharded import is_sharded_checkpoint, load_sharded_weights

    if not is_sharded_checkpoint(checkpoint):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    from gspo.models.load import refuse_custom_code

    refuse_custom_code(checkpoint)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint, local_files_only=True))
    load_sharded_weights(checkpoint, model=model)
    return model


def resolve_checkpoint(source: Path) -> Path:
    """A run directory -> its newest valid checkpoint; a checkpoint -> itself, verified; else the directory."""
    from gspo.checkpoint import find_latest_checkpoint, verify_checkpoint
    from gspo.checkpoint.manifest import checkpoints_root

    if not source.is_dir():
        raise ConfigError(f"'{source}' is not a directory; give a run directory, a checkpoint or a model directory")
    if checkpoints_root(source).is_dir():
        found = find_latest_checkpoint(source)
        if found is None:
            raise CheckpointError(f"run '{source}' has no checkpoint that verifies; nothing to export")
        return found
    if (source / "manifest.json").is_file():
        verify_checkpoint(source, deep=True)
    return source


def run_export(args: list[str]) -> int:
    parsed = parse(EXPORT, args)
    if parsed.help:
        print(render_help(EXPORT))
        return 0
    from gspo.models.load import quiet_transformers

    quiet_transformers()
    print(export_model(parsed.positional(0), parsed.positional(1), merge=parsed.options["merge"]))
    return 0


def _tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer as saved (no pad or padding-side changes), or its base model's."""
    from transformers import AutoTokenizer

    from gspo.models.load import refuse_custom_code
    from gspo.models.load import adapter_base, is_adapter_dir

    source = checkpoint
    if is_adapter_dir(checkpoint) and not (checkpoint / "tokenizer_config.json").exists():
        source = adapter_base(checkpoint)
    refuse_custom_code(source)
    return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
