"""The optimizer and its learning-rate schedule (``optim.*``): AdamW, warm-up then constant / linear / cosine."""

from __future__ import annotations

import math

import torch

from gspo.config.schema import Config


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # One fused kernel per step: on the CPU PyTorch otherwise loops over the parameters with ~10 ops each
    # (it picks foreach / fused by default only on accelerators). TRL's default is the fused AdamW too.
    # FSDP2's sharded DTensor parameters keep PyTorch's own choice.
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                             betas=(0.9, 0.999), eps=config.optim.adam_eps, fused=fused or None)


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
