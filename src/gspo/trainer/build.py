"""The one assembly point: everything a run needs, built once from its config.

:func:`build` makes a training run's :class:`Components` (model, engine, policy wrapper, optimizer,
scheduler, reference, task, renderer, rewards, collector, evaluator, updater, the old-log-probability
plan, logger), including the FSDP2 case; :func:`build_evaluation` makes only what ``gspo eval`` needs.
This is the only module above :mod:`gspo.rollout` that names a concrete engine; the trainer sees the
engine through :class:`~gspo.rollout.base.RolloutEngine` alone. What is decided before the weights load
(precision, the memory plan, the sampler's weights) is :mod:`gspo.trainer.sizing`; the KL reference,
:mod:`gspo.trainer.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from pathlib import Path

from gspo import cuda_settings, host_memory, memory_plan
from gspo import distributed as dist
from gspo.config.schema import Config
from gspo.config.validate import validate_processes
from gspo.errors import ConfigError
from gspo.evaluate import Evaluator
from gspo.models.load import (build_on_meta, load_model, load_tokenizer, pick_device, prepare_tokenizer,
                              resolve_model_path)
from gspo.models.lora import apply_lora
from gspo.precision import DTYPES, MIN_BF16_PARAMS, PrecisionPolicy, resolve_precision
from gspo.rollout.base import RolloutEngine, SamplingParams
from gspo.rollout.hf import HFEngine, Lockstep
from gspo.tasks.base import Task
from gspo.tasks.registry import build_task
from gspo.tasks.render import PromptRenderer, prompt_lengths, prompt_token_cap
from gspo.tasks.rewards import WeightedReward, resolve_rewards
from gspo.trainer.collect import Collector
from gspo.trainer.fsdp_load import (load_local_slices, loads_on_meta, materialize_engine_copy, sample_through,
                                    shard_reference)
from gspo.trainer.logging import MetricsLogger
from gspo.trainer.micro import forward_overhead_tokens
from gspo.trainer.old_logprobs import OldLogprobs, has_dropout, plan_old_logprobs
from gspo.trainer.optim import build_optimizer, build_scheduler
from gspo.trainer.policy import PolicyLogprobs
from gspo.trainer.reference import frozen_copy, reference_logprobs_fn
from gspo.trainer.sizing import memory_settings, precision_and_memory, samples_through_shards
from gspo.trainer.tied_embedding import use_sparse_tied_gradient
from gspo.trainer.update import Updater


@dataclass
class Components:
    """Everything one run needs, built once by :func:`build` (the trainer only runs steps with it)."""

    config: Config
    run_dir: Path | None
    model: torch.nn.Module  # the Hugging Face policy, unwrapped (float32 master weights; sharded under FSDP2)
    tokenizer: object
    engine: RolloutEngine
    policy: torch.nn.Module  # PolicyLogprobs around ``model``, wrapped by DDP / FSDP2 under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reference: torch.nn.Module | None
    device: torch.device
    task: Task
    render: PromptRenderer
    rewards: list[WeightedReward]
    params: SamplingParams
    collector: Collector
    evaluator: Evaluator
    updater: Updater
    old_logprobs: OldLogprobs
    logger: MetricsLogger
    moe: bool
    sharded: bool
    precision: PrecisionPolicy = PrecisionPolicy()  # compute / sampler / master dtypes, decided once (gspo.precision)
    pipeline: object = None  # trainer.pipeline.Pipeline when rollout.max_staleness > 0
    reference_root: torch.nn.Module | None = None  # FSDP2: the sharded reference's ModelCall root (fsdp_load)
    memory: object = None  # gspo.memory_plan.MemoryPlan: the estimate and the auto choices (None: no estimate)

    def sync_weights(self) -> None:
        """Make the sampler use the weights just trained (every process: FSDP2 gathers shards one by one)."""
        self.engine.sync_weights(self.model)

    def refresh_reference(self) -> None:
        """The KL reference becomes a frozen copy of the current policy (``loss.ref_refresh_steps``)."""
        if self.sharded:  # the reference stays whole: the shards are gathered into it one tensor at a time
            dist.copy_full_weights(self.model, self.reference)
        else:
            self.reference = frozen_copy(self.model)


@dataclass
class EvalComponents:
    """What evaluation alone needs (``gspo eval``): no optimizer, no update, no run directory."""

    config: Config
    model: torch.nn.Module
    tokenizer: object
    engine: RolloutEngine
    task: Task
    evaluator: Evaluator


def build(config: Config, run_dir: Path | None = None, *, model: torch.nn.Module | None = None, tokenizer=None,
          task: Task | None = None, rewards: list[WeightedReward] | None = None,
          engine: RolloutEngine | None = None) -> Components:
    """Build a training run from ``config``; the keyword arguments replace what the config would build.

    The data and the rewards come first, so a missing file or a reward that cannot be imported is
    reported before a model is loaded.
    """
    from gspo.moe import SUPPORTED_ARCHITECTURES, supports_routing

    r, o = config.rollout, config.optim
    validate_processes(config, dist.world_size())
    task = task or build_task(config.data, seed=config.seed, eval_size=config.eval.size)
    device = pick_device(config.device)
    if device.type == "cuda":
        cuda_settings.configure_allocator()  # before the first CUDA tensor (the CLI did it earlier still)
    rewards = rewards or resolve_rewards(config.reward.functions, task.rewards, device=device)
    # before the weights load: a run that cannot fit stops here; auto checkpointing / token budget decided
    agents = task.environment is not None
    own_engine = engine is not None
    precision, memory = precision_and_memory(config, device, model, agents=agents, own_engine=own_engine)
    # before the weights load: freed host memory kept for reuse where the plan leaves room for its holes
    reuse = memory_plan.heap_reuse_fits(memory, processes=dist.world_size())
    if host_memory.configure_heap(reuse=reuse) and not reuse and memory is not None:  # said in the start line
        memory = dataclasses.replace(memory, notes=(*memory.notes, "host heap lean: no room for its reuse"))
    on_meta = model is None and loads_on_meta(config, resolve_model_path(config.model))
    model, tokenizer, path = _load_policy(config, device, model, tokenizer, on_meta=on_meta)
    asked_cap, config = config.data.max_prompt_tokens, _resolve_prompt_cap(config, task, tokenizer, model)
    if precision is None:  # a config without the Llama-style shape keys: decided from the loaded model
        precision = resolve_precision(o.dtype, r.engine_dtype, device, sum(p.numel() for p in model.parameters()))
    cuda_settings.apply_matmul_precision(precision.tf32)
    checkpointing, micro_batch_tokens = memory_settings(config, memory)
    if checkpointing:  # training forwards only: the sampler runs in eval mode
        _enable_checkpointing(model)
    sharded = dist.is_initialized() and config.distributed.strategy == "fsdp"
    if not sharded:  # tied weights: the embedding's gradient rows added into the head's, no (V, H) temporary
        use_sparse_tied_gradient(model)
    moe = supports_routing(model)
    replay = config.moe.routing_replay
    if replay != "off" and not moe:
        raise ConfigError(f"moe.routing_replay={replay} needs a Mixture-of-Experts model "
                          f"({', '.join(SUPPORTED_ARCHITECTURES)}); '{config.model}' is dense: set moe.routing_replay=off")
    shards = samples_through_shards(config, precision, memory, agents=agents, own_engine=own_engine)
    # FSDP2 shards ``model`` in place: what needs whole weights is built from it first. The built-in
    # engine keeps its own copy (in rollout.engine_dtype), refreshed tensor by tensor (sync_weights), unless it
    # samples through the shards (rollout.sampler_weights=shards: built after wrapping, below);
    # checkpoints gather the shards to rank 0 when they are written. No other whole copy is kept.
    sampler = None
    if r.max_staleness and engine is None and r.engine != "hf":
        # vLLM samples ahead in the sampler process and is the run's only engine, evaluation included: a
        # second instance (or server) in the trainer process would double its memory and start-up
        sampler = engine = _sampler_engine(config, model, tokenizer, path, device, precision)
    if engine is None and not (on_meta and r.engine != "hf") and not shards:  # vLLM: from the loaded weights
        engine = build_engine(config, model, tokenizer, path, separate_copy=sharded, precision=precision)
    # FSDP2 gathers a unit's shards once per forward call; the shared-prompt path calls the body twice
    policy = PolicyLogprobs(model, top_k=r.top_k, top_p=r.top_p, share_prompts=o.share_prompts and not sharded)
    reference = reference_root = None
    if config.loss.beta > 0:  # LoRA: the policy itself, run with its adapter disabled (see reference_policy)
        reference = model if config.lora.rank else frozen_copy(model)  # before FSDP2 shards ``model``
    policy = dist.wrap_for_training(policy, config.distributed.strategy, param_dtype=_fsdp_param_dtype(precision))
    if shards:  # the sampler runs the sharded model through its FSDP2 root (the policy): no whole copy
        engine = build_engine(config, model, tokenizer, path, precision=precision, through=policy)
    # sharded like the policy, unless refreshed: checkpoints save a refreshed reference whole
    if sharded and reference is not None and reference is not model and not config.loss.ref_refresh_steps:
        reference_root = shard_reference(reference, _fsdp_param_dtype(precision))  # docs/distributed.md
    if on_meta:  # every process allocates its shards and reads only its slices (gspo.trainer.fsdp_load)
        load_local_slices(path, device, [(policy, model)] + ([(reference_root or reference, reference)]
                                                           if reference is not None else []))
        engine = engine or build_engine(config, model, tokenizer, path, separate_copy=True, precision=precision)
        materialize_engine_copy(engine, model, device)
    if replay == "r3" and not engine.info.records_routing:
        raise ConfigError(f"moe.routing_replay=r3 needs the rollout engine's expert choices, which {engine.info.name} "
                          "does not return; use moe.routing_replay=r2 (experts from the trainer's old-policy pass)")
    optimizer = build_optimizer(policy, config)  # after wrapping: FSDP2 replaced the parameters
    scheduler = build_scheduler(optimizer, config, config.steps * o.minibatches * o.epochs)
    render = _renderer(config, tokenizer, model)
    params, collector, evaluator = _sampling(config, task, engine, render, tokenizer, model, rewards)
    updater = _updater(config, precision, max_length=collector.max_response_tokens,  # an episode spans its turns
                       micro_batch_tokens=micro_batch_tokens,
                       forward_overhead=_forward_overhead(model))
    source = "rollout" if config.correction.mode == "bypass" else config.loss.old_logprobs
    plan = plan_old_logprobs(source, engine=engine.info, training_dtype=precision.matmul,
                             dropout=has_dropout(model), moe=moe, routing_replay=replay,
                             diagnostics=config.moe.diagnostics, correction=config.correction.mode)
    # the run's config (config.json) keeps data.max_prompt_tokens as asked: a resume resolves it again
    saved = dataclasses.replace(config, data=dataclasses.replace(config.data, max_prompt_tokens=asked_cap))
    parts = Components(
        config=saved, run_dir=Path(run_dir) if run_dir else None, model=model,
        tokenizer=tokenizer, engine=engine, policy=policy, optimizer=optimizer, scheduler=scheduler,
        reference=reference, device=device, task=task, render=render, rewards=rewards, params=params,
        collector=collector, evaluator=evaluator, updater=updater, old_logprobs=None,  # type: ignore[arg-type]
        logger=MetricsLogger(Path(run_dir) if run_dir else None, tensorboard=config.log.tensorboard,
                             enabled=dist.is_main(), trackers=config.log.trackers, project=config.log.project,
                             run_config=config.to_dict()),
        moe=moe, sharded=sharded, precision=precision, reference_root=reference_root, memory=memory)
    parts.old_logprobs = _old_logprobs(parts, plan)
    if r.max_staleness:  # a sampler process samples ahead of the update (trainer/pipeline.py)
        _attach_pipeline(parts, config, path, sampler)
    return parts


def _old_logprobs(parts: Components, plan) -> OldLogprobs:
    """pi_old's source (``plan``, :func:`~gspo.trainer.old_logprobs.plan_old_logprobs`) wired to the built policy,
    KL reference and update."""
    r, o = parts.config.rollout, parts.config.optim
    temperature, policy, updater = r.temperature, parts.policy, parts.updater
    rows_per_pass = o.micro_batch_size or -(-r.prompts_per_step * r.group_size // dist.world_size() // o.minibatches)

    def reference_logprobs():
        return reference_logprobs_fn(parts, temperature)

    return OldLogprobs(
        plan, policy=lambda ids, attn, num_t, routed=False: policy(ids, attn, num_t, temperature, routed=routed),
        reference=reference_logprobs if parts.reference is not None else None,
        # one process only: under DDP / FSDP2 every forward is a collective, chunk counts must not differ
        chunk_rows=rows_per_pass if dist.world_size() == 1 else 0, routed_model=parts.model,
        # given the update's minibatches (the trainer's case): its own micro-batches, on any world size
        micro_batches=updater.micro_batches, trim=updater.trims)


def _attach_pipeline(parts: Components, config: Config, path, sampler: RolloutEngine | None) -> None:
    """The pipelined mode's sampler process (``rollout.max_staleness`` > 0): ``sampler`` where the run's engine
    already lives there (vLLM), else a new one running ``build_engine``; closed again if the pipeline fails."""
    from gspo.trainer.pipeline import build_pipeline

    try:
        parts.pipeline = build_pipeline(parts, lambda placement: sampler or _sampler_process(
            config, parts.model, parts.tokenizer, path, parts.precision, placement,
            dtype=parts.precision.sampler_dtype))  # the built-in engine: one copy there, in its dtype
    except BaseException:
        if sampler is not None:
            sampler.close()
        raise


def _fsdp_param_dtype(precision: PrecisionPolicy) -> torch.dtype | None:
    """The dtype FSDP2 computes in (the precision policy's compute dtype); the float32 shards stay the master."""
    return precision.autocast_dtype


def _sampler_engine(config: Config, model: torch.nn.Module, tokenizer, path, device: torch.device,
                    precision: PrecisionPolicy):
    """The pipeline's sampler process running the configured engine (``build_engine`` over there)."""
    from gspo.trainer.pipeline import check_pipeline, placements

    check_pipeline(config, device)
    return _sampler_process(config, model, tokenizer, path, precision, placements(model, config)[1])


def _sampler_process(config: Config, model: torch.nn.Module, tokenizer, path, precision: PrecisionPolicy,
                     placement, dtype: torch.dtype | None = None):
    """A sampler process at ``placement`` running ``build_engine`` for ``config`` over there, holding the weights
    in ``dtype`` (None: the model's; vLLM loads its own)."""
    from gspo.rollout.subprocess import SubprocessEngine

    return SubprocessEngine(functools.partial(build_engine, config, precision=precision), model, tokenizer, path,
                            placement=placement, dtype=dtype)


def _renderer(config: Config, tokenizer, model) -> PromptRenderer:
    """Rows -> prompt ids; a prompt longer than ``data.max_prompt_tokens`` (resolved: at most the context
    minus the generation budget) is an error."""
    cap = prompt_token_cap(config.data.max_prompt_tokens, max_new_tokens=config.rollout.max_new_tokens,
                           context=getattr(model.config, "max_position_embeddings", None))
    return PromptRenderer(tokenizer, config.data.system_prompt, config.data.chat_template,
                          max_prompt_tokens=cap or None)


def _resolve_prompt_cap(config: Config, task: Task, tokenizer, model) -> Config:
    """``config`` with ``data.max_prompt_tokens`` resolved (:func:`~gspo.tasks.render.prompt_token_cap`): vLLM
    sizes its context from it, and the renderer refuses a longer prompt, so a longer prompt later is an error
    naming the key rather than a vLLM failure. Auto measures the data with vLLM only; agent episodes span
    the whole context (their turns append to the prompt), so the key stays 0 there."""
    d = config.data
    if task.environment is not None:
        if d.max_prompt_tokens:
            raise ConfigError(f"data.max_prompt_tokens={d.max_prompt_tokens} bounds single-completion prompts; "
                              "an agent episode grows over the model's context turn by turn: leave it 0")
        return config
    lengths = None
    if not d.max_prompt_tokens and config.rollout.engine != "hf":
        lengths = prompt_lengths(task, PromptRenderer(tokenizer, d.system_prompt, d.chat_template))
    cap = prompt_token_cap(d.max_prompt_tokens, max_new_tokens=config.rollout.max_new_tokens, lengths=lengths,
                           context=getattr(model.config, "max_position_embeddings", None))
    return dataclasses.replace(config, data=dataclasses.replace(d, max_prompt_tokens=cap))


def _sampling(config: Config, task: Task, engine, render: PromptRenderer, tokenizer, model, rewards):
    """(sampling params, collector, evaluator): single completions, or multi-turn episodes for agent tasks."""
    r = config.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, ignore_eos=r.ignore_eos)
    if task.environment is not None:  # agents: multi-turn episodes instead of single completions (docs/agents.md)
        from gspo.agents.build import agent_collector, agent_evaluator, episode_runner

        runner = episode_runner(config, task, engine, render, tokenizer, model)
        return params, agent_collector(config, runner, render, rewards, params), agent_evaluator(
            config, runner, render, rewards)
    collector = Collector(engine, render, render.decode, rewards, params, r.group_size, config.advantage_scale,
                          config.loss.overlong_buffer, config.reward.none_policy,
                          record_routing=config.moe.routing_replay == "r3", sum_over_processes=dist.all_reduce_sum)
    evaluator = Evaluator(engine, render, render.decode, rewards, r.max_new_tokens,
                          none_policy=config.reward.none_policy)
    return params, collector, evaluator


def _forward_overhead(model: torch.nn.Module) -> int:
    """Padding mode's per-forward cost in tokens (trainer/micro.py); 0 (one uncut micro-batch, as before) for a
    model under the size where bf16 pays (MIN_BF16_PARAMS): its forwards cost mostly Python, not tokens."""
    params = sum(p.numel() for p in model.parameters())
    return forward_overhead_tokens(params) if params >= MIN_BF16_PARAMS else 0


def _updater(config: Config, precision: PrecisionPolicy, *, max_length: int, micro_batch_tokens: int,
             forward_overhead: int = 0) -> Updater:
    """The minibatch loop for the configured objective, its hyperparameters and rollout correction;
    ``max_length``: the most trained tokens of one response or episode (Dr. GRPO's constant L)."""
    r, o = config.rollout, config.optim
    return Updater(config.algorithm, config.hyperparameters, max_length=max_length,
                   correction=config.correction.mode, correction_thresholds=config.correction.thresholds(),
                   beta=config.loss.beta, kl_estimator=config.loss.kl_estimator,
                   temperature=r.temperature, minibatches=o.minibatches, epochs=o.epochs,
                   micro_batch_size=o.micro_batch_size, micro_batch_tokens=micro_batch_tokens,
                   forward_overhead=forward_overhead,
                   max_grad_norm=o.max_grad_norm, autocast_dtype=precision.autocast_dtype,
                   routing_replay=config.moe.routing_replay != "off")


def build_evaluation(config: Config, *, model: torch.nn.Module | None = None, tokenizer=None,
                     task: Task | None = None) -> EvalComponents:
    """The model, engine, task and evaluator of ``config`` (``gspo eval``): nothing else is built."""
    task = task or build_task(config.data, seed=config.seed, eval_size=config.eval.size)
    device = pick_device(config.device)
    rewards = resolve_rewards(config.reward.functions, task.rewards, device=device)
    model, tokenizer, path = _load_policy(config, device, model, tokenizer)
    config = _resolve_prompt_cap(config, task, tokenizer, model)
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(config, model, tokenizer, path, precision=resolve_precision(
        config.optim.dtype, config.rollout.engine_dtype, device, num_params))
    # agent tasks evaluate whole episodes: _sampling picks the evaluator for the task
    _, _, evaluator = _sampling(config, task, engine, _renderer(config, tokenizer, model), tokenizer, model, rewards)
    return EvalComponents(config, model, tokenizer, engine, task, evaluator)


def _load_policy(config: Config, device: torch.device, model=None, tokenizer=None, *, on_meta: bool = False):
    """(model, tokenizer, path): the policy in float32 master weights, LoRA applied, ready to train.
    ``on_meta``: built on the meta device, without weights (FSDP2 loads them after sharding: fsdp_load)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would interleave with gspo's own progress
    path = None
    if model is None or tokenizer is None:
        path = resolve_model_path(config.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    else:
        tokenizer = prepare_tokenizer(tokenizer, where="the tokenizer passed in")
    torch.manual_seed(config.seed)
    if on_meta:
        model = build_on_meta(path)
    elif model is None:
        model = load_model(path, dtype=torch.float32, device=device)
    else:
        model = model.to(device=device, dtype=torch.float32)
    if config.lora.rank:  # PEFT adapters: the base weights freeze, the optimizer sees only the adapters
        model = apply_lora(model, config.lora, base_path=path)
    _set_cpu_threads(model, config.cpu_threads, device)
    model.config.use_cache = False  # training forwards; the engine asks for a cache explicitly
    model.train()
    return model, tokenizer, path


def build_engine(config: Config, model: torch.nn.Module, tokenizer, path, *, separate_copy: bool = False,
                 precision: PrecisionPolicy | None = None, through: torch.nn.Module | None = None):
    """The rollout engine named by ``rollout.engine``: the one place that names a concrete engine.

    ``separate_copy``: the engine must not sample with ``model`` itself (FSDP2 shards it), so the
    in-process engine keeps its own whole copy, refreshed by ``sync_weights``. ``precision``: the run's
    policy (its ``sampler`` dtype); None = ``rollout.engine_dtype`` as configured (``auto``: the model's).
    ``through``: the FSDP2 root around the sharded ``model``: the built-in engine samples through it, in lockstep
    with the other processes (``rollout.sampler_weights=shards``; the sampler dtype is FSDP2's compute dtype).
    """
    r = config.rollout
    if precision is not None:
        dtype = precision.sampler_dtype
    else:
        dtype = None if r.engine_dtype == "auto" else DTYPES[r.engine_dtype]
    if r.engine in ("vllm", "vllm-server"):
        from gspo.rollout.vllm import build_vllm_engine

        return build_vllm_engine(config, model, tokenizer, path)
    if through is not None:
        return HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, dtype=dtype,
                        decoder="hf", lockstep=Lockstep(call=functools.partial(sample_through, through),
                                                        total=dist.total_over_processes))
    if dtype == next(model.parameters()).dtype and not separate_copy:
        dtype = None
    return HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    dtype=dtype, decoder=r.decoder, copy=separate_copy)


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
