"""Write a checkpoint atomically, then rotate old ones.

A checkpoint is built in a hidden sibling ``.tmp-step-...`` directory, every file and directory is
fsynced, ``manifest.json`` is written last, and one ``os.rename`` publishes it. A kill at any moment
leaves either the previous checkpoints untouched plus a temp directory (removed by the next save),
or the complete new checkpoint. Old checkpoints are deleted only after the new one is durable.
Only one process may write to a run directory at a time (rank 0 under torch.distributed).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from gspo.checkpoint._fs import fsync_dir, replace_file_atomic, respect_umask
from gspo.checkpoint.manifest import checkpoints_root, list_step_dirs, step_dir_name, verify_checkpoint, write_manifest
from gspo.checkpoint.rng import capture_rng_state
from gspo.errors import CheckpointError, ConfigError

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LATEST_NAME = "latest"
REFERENCE_WEIGHTS = "reference.safetensors"  # the KL reference, when it is not the checkpoint's own weights
PLAIN_LEAVES = (torch.Tensor, torch.nn.Parameter, int, float, bool, str, bytes, type(None), torch.dtype, torch.device,
                torch.Size)


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, model_state: dict | None = None,
                    tokenizer: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    trainer_state: dict, rng: dict | None = None, keep_last: int = 3,
                    reference: torch.nn.Module | None = None, staged: Path | None = None) -> Path:
    """Save a complete, verifiable checkpoint to ``run_dir/checkpoints/step-XXXXXXXX`` and return its path.

    ``model`` is a transformers model (saved with ``save_pretrained``, so ``from_pretrained(path)`` works),
    a PEFT model (its adapter only) or any ``nn.Module`` (saved as ``model.safetensors`` only). ``model_state``:
    the whole state dict to write instead of ``model``'s own (an FSDP2-sharded model's, gathered to this
    process; ``model`` then gives the config). ``trainer_state`` must be JSON-serialisable.
    ``rng=None`` captures the current generators (:func:`capture_rng_state`). ``reference``: the KL
    reference when it is neither the base model nor ``model`` (``loss.ref_refresh_steps``), saved as
    ``reference.safetensors``. ``staged``: the temp directory of :func:`stage_checkpoint` into which every
    process already wrote its shards (:mod:`gspo.checkpoint.sharded`); only ``model``'s config is added.
    The newest ``keep_last`` checkpoints are kept. Raises
    :class:`CheckpointError` (nothing is published, older checkpoints untouched) if the state cannot be
    saved safely or the disk write fails.
    """
    state_json = _validate_args(step, trainer_state, keep_last)
    root = checkpoints_root(run_dir)
    name = step_dir_name(step)
    tmp = staged or stage_checkpoint(run_dir, step)
    try:
        _write_payload(tmp, model=model, weights=staged is None, model_state=model_state, tokenizer=tokenizer,
                       optimizer=optimizer, scheduler=scheduler, state_json=state_json,
                       rng=capture_rng_state() if rng is None else rng)
        if reference is not None:
            from safetensors.torch import save_model  # dedups tied tensors the way save_pretrained does

            save_model(unwrap_model(reference), str(tmp / REFERENCE_WEIGHTS))
        write_manifest(tmp, step)
        final = _publish(tmp, root / name)
    except OSError as exc:  # disk full, quota, permissions: say so plainly
        raise CheckpointError(f"could not write checkpoint {name} under {root}: {exc}. Free disk space or fix "
                              "permissions; the previous checkpoints are untouched") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once published (the name no longer exists)
    replace_file_atomic(root / LATEST_NAME, (final.name + "\n").encode())
    _rotate(root, keep_last, newest=final)
    return final


def stage_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A new hidden temp directory for the checkpoint of ``step`` (leftovers of killed saves removed first)."""
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def remove_leftovers(root: Path) -> None:
    """Delete temp and trash entries left by saves or rotations that were killed mid-way."""
    for entry in root.iterdir():
        if not entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP, DataParallel and ``torch.compile`` wrappers (whose keys carry a prefix)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _validate_args(step: int, trainer_state: dict, keep_last: int) -> str:
    """Check the arguments before writing anything; return ``trainer_state`` as JSON text."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"checkpoint step must be an int >= 0, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be an int >= 1, got {keep_last!r}")
    try:
        return json.dumps(trainer_state, indent=1)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"trainer_state is not JSON-serialisable ({exc}); keep only numbers, strings, "
                              "lists and dicts in it (convert tensors with .item() or .tolist())") from exc


def _write_payload(ckpt_dir: Path, *, model, weights: bool, model_state, tokenizer, optimizer, scheduler,
                   state_json: str, rng: dict) -> None:
    """Write every file of a checkpoint (not yet fsynced; :func:`write_manifest` does that)."""
    if weights:
        _save_model(unwrap_model(model), ckpt_dir, model_state)
    else:  # sharded weights already written: the config, for gspo export and from_pretrained of the export
        unwrap_model(model).config.save_pretrained(ckpt_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(ckpt_dir)
    if optimizer is not None:
        _save_loadable(optimizer.state_dict(), ckpt_dir / "optimizer.pt", "optimizer")
    if scheduler is not None:
        _save_loadable(scheduler.state_dict(), ckpt_dir / "scheduler.pt", "scheduler")
    _save_loadable(rng, ckpt_dir / "rng.pt", "rng")
    (ckpt_dir / "trainer_state.json").write_text(state_json)
    respect_umask(ckpt_dir)  # weights written through tempfile are 0600 otherwise


def _save_model(model: torch.nn.Module, ckpt_dir: Path, state: dict | None = None) -> None:
    """Save weights (and config) so both :func:`load_checkpoint` and ``from_pretrained`` can read them.

    ``state``: the whole state dict to write instead of ``model``'s (FSDP2: gathered from the shards)."""
    if hasattr(model, "peft_config"):
        # LoRA: the adapter only (adapter_model.safetensors + adapter_config.json naming the base directory).
        # The base weights are frozen and reloaded from the base model; from_pretrained(ckpt) with PEFT
        # installed loads base + adapter, and `gspo export` writes merged weights.
        if state is None:
            model.save_pretrained(ckpt_dir, safe_serialization=True)
        else:  # FSDP2: the adapter out of the gathered state (the model's own tensors are shards)
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            adapter = get_peft_model_state_dict(model, state_dict=state)
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(ckpt_dir / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(ckpt_dir)
        return
    if not hasattr(model, "save_pretrained"):
        from safetensors.torch import save_file, save_model  # save_model dedups tied tensors

        if state is None:
            save_model(model, str(ckpt_dir / "model.safetensors"))
        else:
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
                      str(ckpt_dir / "model.safetensors"))
        return
    kwargs = {}
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # transformers v5 renames some weights on save (e.g. fused MoE experts back to per-expert keys).
        # Keeping the in-memory names lets load_checkpoint match keys exactly; from_pretrained reads both.
        kwargs["save_original_format"] = False
    if state is not None:
        kwargs["state_dict"] = _untied(model, state)
    model.save_pretrained(ckpt_dir, **kwargs)


def _untied(model: torch.nn.Module, state: dict) -> dict:
    """``state`` with a tied weight under its first name only, as ``save_pretrained`` writes it from the model
    (a gathered state dict holds separate copies, which would be written twice)."""
    own = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    kept = {}
    for name, tensor in state.items():
        key = id(own[name]) if name in own else id(tensor)
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept


def _save_loadable(obj: Any, path: Path, what: str) -> None:
    """``torch.save`` a state, failing now (not at resume) if ``torch.load(weights_only=True)`` would refuse it.

    A walk over the structure clears the usual case for free; anything unusual is checked exactly by
    loading the file back.
    """
    torch.save(obj, path)
    if _is_plain(obj):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"the {what} state holds objects that cannot be loaded safely "
                              f"(torch.load(weights_only=True) refuses them: {exc}); keep only tensors, "
                              "numbers, strings, lists and dicts in it (e.g. a plain function instead of a "
                              "callable object as LambdaLR's lr_lambda)") from exc


def _is_plain(obj: Any) -> bool:
    """Whether ``obj`` is built only from types ``weights_only`` loading always accepts."""
    if type(obj) in (list, tuple):
        return all(_is_plain(item) for item in obj)
    if type(obj) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in obj.items())
    return type(obj) in PLAIN_LEAVES


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the finished temp directory to its final name (replacing a same-step leftover)."""
    trash = None
    if final.exists():  # e.g. a corrupt checkpoint of this step that the resume skipped
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _rotate(root: Path, keep_last: int, *, newest: Path) -> None:
    """Keep ``newest`` and the newest ``keep_last`` valid checkpoints; delete the rest.

    Validity here is the cheap check (manifest present, every file with the right size): hashing
    every kept checkpoint on every save would cost minutes for large models. Invalid ones are deleted.
    """
    kept = 0
    doomed = []
    for _, path in list_step_dirs(root):
        if path == newest or (kept < keep_last and _is_quick_valid(path)):
            kept += 1
        else:
            doomed.append(path)
    for path in reversed(doomed):  # oldest first
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)  # atomic: a kill mid-delete leaves a hidden trash dir, not a half checkpoint
        fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)


def _is_quick_valid(path: Path) -> bool:
    try:
        verify_checkpoint(path, deep=False)
    except CheckpointError:
        return False
    return True
