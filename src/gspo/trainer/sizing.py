"""What a run decides before its weights load: the precision policy, the memory plan, the sampler's weights.

:func:`precision_and_memory` reads the model's shape from ``config.json`` and asks
:func:`gspo.memory_plan.plan` for the ``auto`` settings (activation checkpointing, the token budget and,
under FSDP2, ``rollout.sampler_weights``), so a run that cannot fit is refused before anything loads.
Whether FSDP2's built-in sampler samples through the shards is evaluated here once
(:func:`sampler_can_shard`), fed to the plan, and read back from the plan's result
(:func:`samples_through_shards`).
"""

from __future__ import annotations

import dataclasses

import torch

from gspo import distributed as dist
from gspo.config.schema import Config
from gspo.errors import ConfigError
from gspo.models.load import resolve_model_path
from gspo.precision import PrecisionPolicy, resolve_precision


def precision_and_memory(config: Config, device: torch.device, model: torch.nn.Module | None, *,
                         agents: bool = False, own_engine: bool = False):
    """(precision policy, gspo.memory_plan.MemoryPlan): the memory check and the auto checkpointing / token budget
    / sampler weights, from ``config.json`` alone when the model is still to be loaded (a LoRA adapter
    directory: its base's). (None, None) when the config does not name the shape keys the estimate reads
    (layers, hidden, heads, vocabulary): no check then. ``agents``: an agent task; ``own_engine``: an engine
    passed in (neither samples through the shards)."""
    from gspo import host_memory, memory, memory_plan
    from gspo.models.load import adapter_base, is_adapter_dir

    try:
        if model is not None:
            shape = memory.ModelShape.from_config(model.config.to_dict())
        else:
            path = resolve_model_path(config.model)
            shape = memory.ModelShape.from_dir(adapter_base(path) if is_adapter_dir(path) else path)
    except (KeyError, TypeError, ValueError, OSError):
        return None, None
    o = config.optim
    precision = resolve_precision(o.dtype, config.rollout.engine_dtype, device, shape.params)
    run = memory.RunShape.from_config(config, precision, processes=dist.world_size(), device=device.type)
    shardable = sampler_can_shard(config, precision, agents=agents, own_engine=own_engine)  # before the load
    run = dataclasses.replace(run, sampler_can_shard=shardable)
    available = memory_plan.available_bytes(device.type)
    if dist.is_initialized():  # every process decides alike: by the least memory any of them has
        available = min(dist.all_gather_object(available))
    weights = config.rollout.sampler_weights if shardable else "copy"  # (shards that cannot: refused above)
    return precision, memory_plan.plan(shape, run, checkpointing=o.gradient_checkpointing,
                                       micro_batch_tokens=o.micro_batch_tokens, available=available,
                                       sampler_weights=weights, heap_reuse=host_memory.heap_reusable())


def sampler_can_shard(config: Config, precision: PrecisionPolicy, *, agents: bool, own_engine: bool) -> bool:
    """Whether the built-in sampler can sample through the FSDP2 shards (memory_plan.sampler_shards_refusal; an
    engine passed in never does); an explicit ``rollout.sampler_weights=shards`` that cannot is refused with the
    reason."""
    from gspo import memory_plan

    if own_engine:
        return False
    reason = memory_plan.sampler_shards_refusal(config, precision, dist.world_size(), agents=agents)
    if reason is not None and config.rollout.sampler_weights == "shards":
        raise ConfigError(f"rollout.sampler_weights=shards: {reason}; or set rollout.sampler_weights=auto")
    return reason is None


def samples_through_shards(config: Config, precision: PrecisionPolicy, memory, *, agents: bool,
                           own_engine: bool) -> bool:
    """Whether the built-in sampler samples through the FSDP2 shards: the memory plan's choice (``memory``, which
    chose shards only where :func:`sampler_can_shard` allowed it); without an estimate (``memory`` None), an
    explicit ``rollout.sampler_weights=shards`` where the sampler can (``auto``: the whole copy)."""
    if memory is not None:
        return memory.sampler_weights == "shards"
    return config.rollout.sampler_weights == "shards" and sampler_can_shard(config, precision, agents=agents,
                                                                            own_engine=own_engine)


def memory_settings(config: Config, plan) -> tuple[bool, int]:
    """(activation checkpointing, token budget) as gspo.memory_plan decided; without an estimate, ``auto`` is off."""
    if plan is not None:
        return plan.checkpointing, plan.micro_batch_tokens
    o = config.optim
    return o.gradient_checkpointing == "true", max(o.micro_batch_tokens, 0)
