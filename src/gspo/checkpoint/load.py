"""Find the newest good checkpoint and load it back, refusing anything corrupt or unsafe.

Nothing read from a checkpoint is executed: weights come from safetensors, and ``.pt`` files are read
only with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses
any other pickled object.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from gspo import distributed as dist
from gspo.checkpoint.manifest import checkpoints_root, list_step_dirs, verify_checkpoint
from gspo.checkpoint.save import REFERENCE_WEIGHTS, unwrap_model
from gspo.errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PEFT's save_pretrained writes for a LoRA model
MAX_KEYS_SHOWN = 5  # key lists in error messages are cut to this many


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint directory failed verification and was skipped."""


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint under ``run_dir/checkpoints`` whose manifest fully verifies, or None.

    Partial, truncated or corrupt checkpoints are skipped with a :class:`CorruptCheckpointWarning`
    naming the bad file and the mismatch. Temp directories of killed saves are ignored. The
    ``latest`` pointer file is not consulted.
    """
    for _, path in list_step_dirs(checkpoints_root(run_dir)):
        try:
            verify_checkpoint(path, deep=True)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path.name}: {exc}", CorruptCheckpointWarning, stacklevel=2)
            continue
        return path
    return None


def load_checkpoint(path: str | Path, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    reference: torch.nn.Module | None = None) -> dict:
    """Verify the checkpoint at ``path`` and load it into the given objects.

    Weights are loaded in place into ``model`` (same architecture; every key must match, tied weights
    excepted; DDP and ``torch.compile`` wrappers are looked through); ``optimizer`` and ``scheduler``
    get their ``load_state_dict`` called; ``reference`` gets the saved KL reference, if the checkpoint has
    one (``"reference"`` in the result says whether it had). Returns
    ``{"step", "trainer_state", "rng", "path", "reference"}``; pass ``rng`` to :func:`restore_rng_state` last.
    Raises :class:`CheckpointError` naming the file if anything is missing, corrupt or mismatched.
    """
    path = Path(path)
    manifest = verify_checkpoint(path, deep=True)
    files = manifest["files"]
    sharded = model is not None and dist.is_sharded(unwrap_model(model))
    if model is not None:
        model = unwrap_model(model)
        if hasattr(model, "peft_config") and sharded:  # LoRA under FSDP2: rank 0 reads, the shards receive
            load_sharded_adapter(path, files, model)
        elif hasattr(model, "peft_config"):  # LoRA: the adapter; the frozen base comes from the base model
            load_adapter_weights(path, files, model)
        elif sharded:
            load_sharded_weights(path, files, model)
        else:
            load_model_weights(path, files, model)
    if optimizer is not None:  # FSDP2: rank 0 reads the whole state, the optimizer scatters it (see run.py)
        _load_state(optimizer, path, files, "optimizer.pt", read=not sharded or dist.is_main())
    if scheduler is not None:
        _load_state(scheduler, path, files, "scheduler.pt")
    has_reference = REFERENCE_WEIGHTS in files
    if reference is not None and has_reference:
        _load_reference(path / REFERENCE_WEIGHTS, unwrap_model(reference))
    rng = _torch_load(path / "rng.pt") if "rng.pt" in files else None
    trainer_state = json.loads((path / "trainer_state.json").read_text()) if "trainer_state.json" in files else {}
    return {"step": manifest["step"], "trainer_state": trainer_state, "rng": rng, "path": path,
            "reference": has_reference}


def load_model_weights(ckpt_dir: Path, files: dict, model: torch.nn.Module) -> None:
    """Load ``model*.safetensors`` into ``model`` in place, strictly.

    ``save_pretrained`` writes a tied weight once (e.g. ``lm_head.weight`` tied to the embeddings is
    omitted), so a key may be missing only if it shares storage with a key that was loaded.
    """
    from safetensors.torch import load_file

    shards = sorted(name for name in files if name.startswith("model") and name.endswith(".safetensors"))
    if not shards and ADAPTER_WEIGHTS in files:
        raise CheckpointError(f"{ckpt_dir} holds a LoRA adapter, not full weights; load it into a model with the "
                              "same adapter (the run's lora.* settings), or export merged weights with gspo export")
    if not shards:
        raise CheckpointError(f"{ckpt_dir} holds no model*.safetensors; it was saved without weights")
    expected = model.state_dict()
    loaded: set[str] = set()
    for shard in shards:
        tensors = load_file(ckpt_dir / shard)
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise CheckpointError(f"{ckpt_dir / shard} has weights the model lacks ({_keys(unexpected)}); "
                                  "build the model from the checkpoint's config.json (same architecture)")
        try:
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise CheckpointError(f"{ckpt_dir / shard} does not fit the model: {exc}") from exc
        loaded.update(tensors)
    missing = sorted(k for k in set(expected) - loaded if not _tied_to_loaded(k, expected, loaded))
    if missing:
        raise CheckpointError(f"{ckpt_dir} lacks weights the model has ({_keys(missing)}); "
                              "build the model from the checkpoint's config.json (same architecture)")


def load_sharded_weights(ckpt_dir: Path, files: dict, model: torch.nn.Module) -> None:
    """Load the whole weights of ``model*.safetensors`` into FSDP2 shards (every process calls this).

    Rank 0 alone reads the files and checks every key; each tensor is then broadcast and each process
    keeps its shard, so a checkpoint saved by any number of processes resumes into any other.
    """
    weights: dict[str, torch.Tensor] = {}
    problem = None
    if dist.is_main():
        try:
            weights = read_model_weights(ckpt_dir, files)
        except CheckpointError as exc:
            problem = str(exc)
        unexpected = sorted(set(weights) - set(model.state_dict()))
        missing = sorted(_required_keys(model) - set(weights)) if weights else []
        if unexpected or missing:
            problem = (f"{ckpt_dir} does not match the model (unexpected: {_keys(unexpected) or 'none'}; missing: "
                       f"{_keys(missing) or 'none'}); build the model from the checkpoint's config.json")
    problem = dist.all_gather_object(problem)[0]  # every process raises, none waits in the broadcast
    if problem:
        raise CheckpointError(problem)
    dist.load_full_model_state(model, weights)


def read_model_weights(ckpt_dir: Path, files: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's ``model*.safetensors``, by name (whole, on the CPU)."""
    from safetensors.torch import load_file

    shards = sorted(name for name in files if name.startswith("model") and name.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{ckpt_dir} holds no model*.safetensors; it was saved without weights")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(ckpt_dir / shard))
    return weights


def read_full_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(whole weights by name, the name-keyed optimizer state) of a verified checkpoint, on the CPU."""
    path = Path(path)
    files = verify_checkpoint(path, deep=True)["files"]
    return read_model_weights(path, files), _torch_load(path / "optimizer.pt")


def _required_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys a checkpoint must hold: a tied weight (the same parameter under two names) once."""
    seen: set[int] = set()
    required = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            required.add(name)
    return required


def load_sharded_adapter(ckpt_dir: Path, files: dict, model: torch.nn.Module) -> None:
    """Load ``adapter_model.safetensors`` into an FSDP2-sharded PEFT model (every process calls this)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    problem = None
    if dist.is_main():
        own = model.state_dict()
        if ADAPTER_WEIGHTS not in files:
            problem = f"{ckpt_dir} holds no {ADAPTER_WEIGHTS}: resume it with lora.rank=0 (the run's own config)"
        else:  # PEFT saves "...lora_A.weight" for the module's "...lora_A.default.weight"
            for name, tensor in load_file(ckpt_dir / ADAPTER_WEIGHTS).items():
                named = name.removesuffix(".weight") + ".default.weight"
                weights[named if named in own else name] = tensor
            unknown = sorted(set(weights) - set(own))
            if unknown:
                problem = f"{ckpt_dir / ADAPTER_WEIGHTS} does not match the model's adapter ({_keys(unknown)})"
    problem = dist.all_gather_object(problem)[0]  # every process raises, none waits in the broadcast
    if problem:
        raise CheckpointError(problem + "; resume with the run's own lora.* settings")
    dist.load_full_model_state(model, weights)


def load_adapter_weights(ckpt_dir: Path, files: dict, model: torch.nn.Module) -> None:
    """Load ``adapter_model.safetensors`` into a PEFT model in place; every adapter weight must be there."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if ADAPTER_WEIGHTS not in files:
        raise CheckpointError(f"{ckpt_dir} holds no {ADAPTER_WEIGHTS}: it was saved from a model without LoRA; "
                              "resume it with lora.rank=0 (the run's own config)")
    try:
        result = set_peft_model_state_dict(model, load_file(ckpt_dir / ADAPTER_WEIGHTS))
    except RuntimeError as exc:  # shape mismatch, e.g. another lora.rank
        raise CheckpointError(f"{ckpt_dir / ADAPTER_WEIGHTS} does not fit the model's adapter: {exc}") from exc
    missing = sorted(k for k in result.missing_keys if "lora_" in k)
    if result.unexpected_keys or missing:
        raise CheckpointError(f"{ckpt_dir / ADAPTER_WEIGHTS} does not match the model's adapter (unexpected: "
                              f"{_keys(sorted(result.unexpected_keys)) or 'none'}; missing: {_keys(missing) or 'none'}); "
                              "resume with the run's own lora.* settings")


def _load_reference(file: Path, reference: torch.nn.Module) -> None:
    """Load ``reference.safetensors`` into the reference module in place, strictly (tied weights allowed)."""
    from safetensors.torch import load_model

    try:
        load_model(reference, str(file), strict=True)
    except RuntimeError as exc:  # missing / unexpected keys or shapes
        raise CheckpointError(f"{file} does not fit the KL reference model ({exc}); "
                              "resume with the run's own model") from exc


def _tied_to_loaded(key: str, state: dict[str, torch.Tensor], loaded: set[str]) -> bool:
    """Whether ``state[key]`` shares memory with a tensor that was loaded (a tied weight)."""
    tensor = state[key]
    if tensor.numel() == 0:
        return True  # nothing to restore
    return any(state[other].data_ptr() == tensor.data_ptr() for other in loaded)


def _load_state(target: Any, ckpt_dir: Path, files: dict, name: str, *, read: bool = True) -> None:
    """``target.load_state_dict`` from a weights-only ``.pt`` file of the checkpoint (``read=False``: of ``{}``,
    on the processes that receive the state from rank 0)."""
    if name not in files:
        raise CheckpointError(f"{ckpt_dir} has no {name} (it was saved without one); "
                              f"pass {name.removesuffix('.pt')}=None to load_checkpoint to skip it")
    try:
        target.load_state_dict(_torch_load(ckpt_dir / name) if read else {})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_dir / name} does not match the {type(target).__name__} given ({exc}); "
                              "build it with the same parameters and settings as the saved run") from exc


def _torch_load(path: Path) -> Any:
    """``torch.load`` that only accepts tensors and plain containers (never runs pickled code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be loaded safely: {type(exc).__name__}: {exc}. gspo only reads "
                              "tensors and plain containers from checkpoints (weights_only=True); do not trust "
                              "this file, resume from another checkpoint") from exc


def _keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f", ... {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else "")
