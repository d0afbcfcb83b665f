"""Up-front validation of a :class:`Config`: every message names the key, the value and the fix."""

from __future__ import annotations

from gspo.algorithms.catalogue import ADVANTAGE_SCALES, CORRECTION_MODES, KL_ESTIMATORS, SPECS
from gspo.config.schema import ALGORITHMS, AUTO, Config
from gspo.errors import ConfigError

OLD_LOGPROB_SOURCES = ("auto", "recompute", "rollout")


def validate(config: Config) -> None:
    """Raise ConfigError on the first invalid value (checked before any model is loaded)."""
    _choice("algorithm", config.algorithm, ALGORITHMS)
    _choice("device", config.device, ("auto", "cpu", "cuda"))
    _positive("steps", config.steps)
    _minimum("seed", config.seed, 0)
    _minimum("cpu_threads", config.cpu_threads, 0)

    r = config.rollout
    _positive("rollout.prompts_per_step", r.prompts_per_step)
    if r.group_size < 2:
        raise ConfigError(
            f"rollout.group_size={r.group_size}: group advantages need at least 2 responses per prompt "
            "(the paper and TRL use 8 or more); set rollout.group_size=8"
        )
    _positive("rollout.max_new_tokens", r.max_new_tokens)
    _minimum("rollout.temperature", r.temperature, 0.0)
    if r.temperature == 0:
        raise ConfigError("rollout.temperature=0 is greedy: every response of a group is the same and no "
                          "advantage is non-zero; use a temperature around 1.0")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]; 1.0 turns nucleus sampling off")
    _minimum("rollout.top_k", r.top_k, 0)
    _choice("rollout.engine", r.engine, ("hf", "vllm", "vllm-server"))
    _choice("rollout.engine_dtype", r.engine_dtype, ("auto", "float32", "bfloat16", "float16"))
    _choice("rollout.decoder", r.decoder, ("auto", "native", "hf"))
    _choice("rollout.sampler_weights", r.sampler_weights, ("auto", "copy", "shards"))
    _positive("rollout.vllm_kv_cache_gb", r.vllm_kv_cache_gb)
    if not 0 <= r.vllm_gpu_memory <= 1:
        raise ConfigError(f"rollout.vllm_gpu_memory={r.vllm_gpu_memory} is a fraction of GPU memory in (0, 1] "
                          "(e.g. 0.6: the rest is training's), or 0 for auto")
    _minimum("rollout.vllm_request_timeout_s", r.vllm_request_timeout_s, 0.0)
    _minimum("data.max_prompt_tokens", config.data.max_prompt_tokens, 0)
    _validate_pipeline(config)  # rollout.max_staleness

    loss = config.loss
    spec = SPECS[config.algorithm]
    low, high = config.clip_range
    if low is None and (loss.clip_low is not None or loss.clip_high is not None):
        raise ConfigError(f"algorithm={config.algorithm} has no clip range (its hyperparameters: "
                          f"{', '.join(spec.hyperparameters)}); set them with loss.params=name=value")
    for key, value in (("loss.clip_low", low), ("loss.clip_high", high)):
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value} is negative; clip ranges are epsilons >= 0 (GSPO: 3e-4 / 4e-4)")
    if low is not None and low >= 1 and config.algorithm != "cispo":  # CISPO's lower bound may reach 0
        raise ConfigError(f"loss.clip_low={low} must be below 1 (the ratio is clipped to [1 - clip_low, ...])")
    _validate_params(config.algorithm, loss.params, spec.hyperparameters)
    _validate_correction(config)
    _choice("loss.advantage_scale", loss.advantage_scale, ("auto", *ADVANTAGE_SCALES))
    _minimum("loss.beta", loss.beta, 0.0)
    _choice("loss.kl_estimator", loss.kl_estimator, KL_ESTIMATORS)
    _minimum("loss.ref_refresh_steps", loss.ref_refresh_steps, 0)
    _choice("loss.old_logprobs", loss.old_logprobs, OLD_LOGPROB_SOURCES)
    _minimum("loss.overlong_buffer", loss.overlong_buffer, 0)
    if loss.overlong_buffer >= r.max_new_tokens:
        raise ConfigError(
            f"loss.overlong_buffer={loss.overlong_buffer} must be smaller than rollout.max_new_tokens="
            f"{r.max_new_tokens} (DAPO's soft buffer L_cache sits inside the generation limit)"
        )

    o = config.optim
    if not o.lr > 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive (RL on small models: around 1e-4 or less)")
    _minimum("optim.warmup_steps", o.warmup_steps, 0)
    _choice("optim.schedule", o.schedule, ("constant", "linear", "cosine"))
    _minimum("optim.weight_decay", o.weight_decay, 0.0)
    _positive("optim.adam_eps", o.adam_eps)
    _minimum("optim.max_grad_norm", o.max_grad_norm, 0.0)
    _positive("optim.minibatches", o.minibatches)
    _positive("optim.epochs", o.epochs)
    _minimum("optim.micro_batch_size", o.micro_batch_size, 0)
    _choice("optim.dtype", o.dtype, ("auto", "float32", "bfloat16"))
    _choice("optim.gradient_checkpointing", o.gradient_checkpointing, ("auto", "true", "false"))
    if o.micro_batch_tokens < AUTO:
        raise ConfigError(f"optim.micro_batch_tokens={o.micro_batch_tokens} must be auto, 0 (off) or a token budget")
    if o.micro_batch_tokens > 0 and o.micro_batch_size:
        raise ConfigError(f"optim.micro_batch_tokens={o.micro_batch_tokens} and optim.micro_batch_size="
                          f"{o.micro_batch_size} both split the minibatch; set one of them to 0")
    batch = r.prompts_per_step * r.group_size
    if batch % o.minibatches:
        raise ConfigError(
            f"optim.minibatches={o.minibatches} does not divide the rollout batch of "
            f"{r.prompts_per_step} prompts x {r.group_size} responses = {batch}; "
            f"choose a divisor of {batch} (e.g. {_nearest_divisor(batch, o.minibatches)})"
        )
    validate_processes(config, 1)

    _choice("reward.none_policy", config.reward.none_policy, ("zero", "error"))
    if config.eval.every < AUTO:
        raise ConfigError(f"eval.every={config.eval.every} must be auto, 0 (only before and after training) or a "
                          "number of steps")
    _minimum("eval.size", config.eval.size, 0)
    _minimum("eval.samples", config.eval.samples, 1)
    _minimum("checkpoint.every", config.checkpoint.every, 0)
    _positive("checkpoint.keep_last", config.checkpoint.keep_last)
    _minimum("log.samples", config.log.samples, 0)
    _positive("log.every", config.log.every)
    _choice("moe.routing_replay", config.moe.routing_replay, ("off", "r2", "r3"))
    if config.dynamic_sampling and config.moe.routing_replay == "r3":
        raise ConfigError("DAPO dynamic sampling with moe.routing_replay=r3 is not supported (the kept groups of "
                          "several rounds would need their routing records merged); use moe.routing_replay=r2 "
                          "or loss.dynamic_sampling=false")
    _choice("distributed.strategy", config.distributed.strategy, ("ddp", "fsdp"))
    _choice("data.chat_template", config.data.chat_template, ("auto", "always", "never"))
    _validate_lora(config)
    _validate_trackers(config.log.trackers)


def validate_processes(config: Config, processes: int) -> None:
    """What ``processes`` data-parallel processes need of the batch sizes (``gspo train --nproc N``, torchrun).

    Each process samples whole groups of an equal share of the prompts and trains on an equal share of
    every minibatch (gspo.trainer.minibatches), so ``optim.micro_batch_size`` must divide that local share.
    Where ``optim.minibatches`` does not divide a process's responses, shares are padded instead (a row or
    two of zero weight per step) and any micro-batch size works.
    """
    r, o = config.rollout, config.optim
    if r.prompts_per_step % processes:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} does not split over {processes} processes (each "
            f"samples whole groups of an equal share); choose a multiple of {processes} (e.g. "
            f"{processes * max(r.prompts_per_step // processes, 1)}) or a number of processes dividing "
            f"{r.prompts_per_step}"
        )
    local = r.prompts_per_step // processes * r.group_size  # responses per process
    if not o.micro_batch_size or local % o.minibatches:
        return
    share = local // o.minibatches
    if share % o.micro_batch_size:
        where = "" if processes == 1 else f" each of the {processes} processes trains"
        raise ConfigError(
            f"optim.micro_batch_size={o.micro_batch_size} does not divide the {share} responses{where} per "
            f"minibatch ({r.prompts_per_step * r.group_size} responses / {o.minibatches} minibatches"
            f"{'' if processes == 1 else f' / {processes} processes'}); choose a divisor of {share} or 0 "
            "(no accumulation)"
        )


def _validate_params(algorithm: str, params: list[str], allowed) -> None:
    for item in params:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed or key in ("clip_low", "clip_high"):
            names = ", ".join(k for k in allowed if k not in ("clip_low", "clip_high")) or "none besides the clip range"
            raise ConfigError(f"loss.params={item!r}: {algorithm} takes name=value for {names} "
                              "(clip_low / clip_high have their own keys, loss.clip_low=...)")
        try:
            float(value)
        except ValueError:
            raise ConfigError(f"loss.params={item!r}: {value!r} is not a number") from None


def _validate_correction(config: Config) -> None:
    c = config.correction
    _choice("correction.mode", c.mode, CORRECTION_MODES)
    for key in ("threshold", "low", "high", "delta"):
        if getattr(c, key) is not None and key not in c.thresholds():
            takes = ", ".join(c.thresholds()) or "no thresholds"
            raise ConfigError(f"correction.{key} does not apply to correction.mode={c.mode} (it takes {takes})")
    if c.mode == "bypass" and config.loss.old_logprobs == "recompute":
        raise ConfigError("correction.mode=bypass means pi_old = the engine's log-probabilities, but "
                          "loss.old_logprobs=recompute; drop one of the two")
    if c.mode not in ("none", "bypass") and config.loss.old_logprobs == "rollout":
        raise ConfigError(f"correction.mode={c.mode} corrects between recomputed old log-probabilities and the "
                          "engine's, but loss.old_logprobs=rollout makes them the same; set loss.old_logprobs=recompute "
                          "(or auto)")


def _validate_pipeline(config: Config) -> None:
    """rollout.max_staleness > 0 (docs/pipeline.md): pi_old of a stale batch is the sampler's own policy."""
    s = config.rollout.max_staleness
    _minimum("rollout.max_staleness", s, 0)
    if not s:
        return
    if config.loss.old_logprobs == "recompute" or config.correction.mode not in ("none", "bypass"):
        raise ConfigError(f"rollout.max_staleness={s}: pi_old of a stale batch is the policy that sampled it (the "
                          "sampler's log-probabilities); a recomputation with the current weights would be another "
                          "policy. Use loss.old_logprobs=auto or rollout and correction.mode=none, or max_staleness=0")
    if config.dynamic_sampling:
        raise ConfigError(f"rollout.max_staleness={s} with DAPO dynamic sampling is not supported (its extra "
                          "rounds depend on the batch just scored); set loss.dynamic_sampling=false or "
                          "rollout.max_staleness=0")


# log.trackers name -> (module that must import, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "trackers"), "wandb": ("wandb", "trackers-cloud"),
            "mlflow": ("mlflow", "trackers-cloud")}


def _validate_lora(config: Config) -> None:
    lora = config.lora
    _minimum("lora.rank", lora.rank, 0)
    if not lora.rank:
        return
    if not lora.alpha > 0:
        raise ConfigError(f"lora.alpha={lora.alpha} must be positive (the adapter is scaled by alpha / rank; "
                          "common: alpha = rank or 2 x rank)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout={lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        raise ConfigError("lora.target_modules is empty; name modules (e.g. q_proj,v_proj) or use all-linear")
    if config.loss.ref_refresh_steps:
        raise ConfigError(f"loss.ref_refresh_steps={config.loss.ref_refresh_steps} with lora.rank={lora.rank}: "
                          "under LoRA the KL reference is the base model (adapter disabled), which never changes; "
                          "set loss.ref_refresh_steps=0, or train without LoRA (lora.rank=0)")
    if not _installed("peft"):
        raise ConfigError(f"lora.rank={lora.rank} needs PEFT: pip install 'gspo[lora]' (or set lora.rank=0)")


def _validate_trackers(trackers: list[str]) -> None:
    for name in trackers:
        _choice("log.trackers", name, tuple(TRACKERS))
        module, extra = TRACKERS[name]
        if not _installed(module):
            raise ConfigError(f"log.trackers={name} needs the {module} package: pip install 'gspo[{extra}]' "
                              f"(or drop {name} from log.trackers)")


def _installed(module: str) -> bool:
    import importlib.util
    import sys

    if module in sys.modules:  # imported already, or a stand-in injected by a test (None blocks it)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        from gspo.suggest import did_you_mean

        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}."
                          f"{did_you_mean(str(value), [str(a) for a in allowed])}")


def _positive(key: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be positive")


def _minimum(key: str, value: int | float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _nearest_divisor(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))
