"""Build the trainer's parts from a config: policy, tokenizer, engine, optimizer, schedule, reference."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from gspo.config.schema import Config
from gspo.models.load import load_model, load_tokenizer, pick_device, resolve_model_path
from gspo.rollout.hf import HFEngine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Parts:
    model: torch.nn.Module
    tokenizer: object
    engine: HFEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reference: torch.nn.Module | None
    device: torch.device


def build_parts(config: Config) -> Parts:
    """Load the policy and everything that depends on it. Master weights are float32."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would interleave with gspo's own progress
    device = pick_device(config.device)
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(config.seed)
    model = load_model(path, dtype=torch.float32, device=device)
    if config.lora.rank:  # PEFT adapters: the base weights freeze, the optimizer sees only the adapters
        from gspo.models.lora import apply_lora

        model = apply_lora(model, config.lora, base_path=path)
    _set_cpu_threads(model, config.cpu_threads, device)
    if config.optim.gradient_checkpointing:  # training forwards only: the sampler runs in eval mode
        _enable_checkpointing(model)
    model.config.use_cache = False  # training forwards; the engine asks for a cache explicitly
    model.train()
    engine_dtype = None if config.rollout.engine_dtype in ("auto", "float32") else DTYPES[config.rollout.engine_dtype]
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      dtype=engine_dtype, decoder=config.rollout.decoder)
    optimizer = build_optimizer(model, config)
    total = config.steps * config.optim.minibatches * config.optim.epochs
    scheduler = build_scheduler(optimizer, config, total)
    reference = None
    if config.loss.beta > 0:  # LoRA: the policy itself, run with its adapter disabled (see reference_policy)
        reference = model if config.lora.rank else frozen_copy(model)
    return Parts(model, tokenizer, engine, optimizer, scheduler, reference, device)


# Below this size a forward is a few hundred tiny ops: measured on the 1M-parameter default, one
# thread runs a step in ~1 s where two contending threads took ~15 s on a loaded 2-core machine.
SINGLE_THREAD_MAX_PARAMS = 50_000_000


def _set_cpu_threads(model: torch.nn.Module, threads: int, device: torch.device) -> None:
    if device.type != "cpu":
        return
    if threads == 0 and sum(p.numel() for p in model.parameters()) < SINGLE_THREAD_MAX_PARAMS:
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (the transformers >= 5.x name first)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # One fused kernel per step: on the CPU PyTorch otherwise loops over the parameters with ~10 ops each
    # (it picks foreach / fused by default only on accelerators). TRL's default is the fused AdamW too.
    # FSDP2's sharded DTensor parameters keep PyTorch's own choice.
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                             betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def build_scheduler(optimizer, config: Config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear decay to 0, or cosine to 0 (per optimizer step)."""
    warmup, schedule = config.optim.warmup_steps, config.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def reference_policy(parts: Parts) -> Iterator[torch.nn.Module]:
    """The module whose log-probabilities are the KL reference, for the duration of the block.

    Full fine-tuning: the frozen copy. LoRA: the policy with its adapter disabled, i.e. the base model,
    without a second copy of the weights in memory.
    """
    from gspo.models.lora import is_peft

    if parts.reference is parts.model and is_peft(parts.model):
        with parts.model.disable_adapter():
            yield parts.model
    else:
        yield parts.reference


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached, frozen copy of the policy (the KL reference)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def resolve_old_logprobs(config: Config, model: torch.nn.Module, engine: HFEngine, moe: bool) -> str:
    """``loss.old_logprobs`` with ``auto`` resolved to ``rollout`` or ``recompute``.

    ``auto`` takes the sampler's log-probabilities when a recomputation could only reproduce them up to
    float rounding: the sampler runs the training module's own float32 weights (no lower-precision copy),
    training runs in float32 (no autocast), the model has no dropout (the sampler runs in eval mode,
    training forwards in train mode) and is dense (MoE runs keep the old-policy pass: it records the
    experts for R2 replay and the volatility diagnostics). Otherwise the pass is needed: ``recompute``.
    """
    source = config.loss.old_logprobs
    if source != "auto":
        return source
    same_weights = engine.shares_model and next(model.parameters()).dtype == torch.float32
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or any(
        float(getattr(model.config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "hidden_dropout"))
    exact = same_weights and config.optim.dtype == "float32" and not dropout and not moe
    return "rollout" if exact else "recompute"
