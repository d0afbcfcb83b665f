"""Up-front validation of a :class:`Config`: every message names the key, the value and the fix."""

from __future__ import annotations

from gspo.config.schema import ALGORITHMS, Config
from gspo.errors import ConfigError


def validate(config: Config) -> None:
    """Raise ConfigError on the first invalid value (checked before any model is loaded)."""
    _choice("algorithm", config.algorithm, ALGORITHMS)
    _choice("device", config.device, ("auto", "cpu", "cuda"))
    _positive("steps", config.steps)
    _minimum("seed", config.seed, 0)

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
    _choice("rollout.engine_dtype", r.engine_dtype, ("auto", "float32", "bfloat16"))

    loss = config.loss
    low, high = config.clip_range
    for key, value in (("loss.clip_low", low), ("loss.clip_high", high)):
        if value < 0:
            raise ConfigError(f"{key}={value} is negative; clip ranges are epsilons >= 0 (GSPO: 3e-4 / 4e-4)")
    if low >= 1:
        raise ConfigError(f"loss.clip_low={low} must be below 1 (the ratio is clipped to [1 - clip_low, ...])")
    _choice("loss.advantage_scale", loss.advantage_scale, ("group", "batch", "none"))
    _minimum("loss.beta", loss.beta, 0.0)
    _choice("loss.kl_estimator", loss.kl_estimator, ("k1", "k2", "k3"))
    _minimum("loss.ref_refresh_steps", loss.ref_refresh_steps, 0)
    _choice("loss.old_logprobs", loss.old_logprobs, ("recompute", "rollout"))
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
    _minimum("optim.max_grad_norm", o.max_grad_norm, 0.0)
    _positive("optim.minibatches", o.minibatches)
    _positive("optim.epochs", o.epochs)
    _minimum("optim.micro_batch_size", o.micro_batch_size, 0)
    _choice("optim.dtype", o.dtype, ("float32", "bfloat16"))
    batch = r.prompts_per_step * r.group_size
    if batch % o.minibatches:
        raise ConfigError(
            f"optim.minibatches={o.minibatches} does not divide the rollout batch of "
            f"{r.prompts_per_step} prompts x {r.group_size} responses = {batch}; "
            f"choose a divisor of {batch} (e.g. {_nearest_divisor(batch, o.minibatches)})"
        )
    if o.micro_batch_size and (batch // o.minibatches) % o.micro_batch_size:
        raise ConfigError(
            f"optim.micro_batch_size={o.micro_batch_size} does not divide the minibatch of "
            f"{batch // o.minibatches} responses; choose a divisor of it or 0 (no accumulation)"
        )

    _choice("reward.none_policy", config.reward.none_policy, ("zero", "error"))
    _minimum("eval.every", config.eval.every, 0)
    _minimum("eval.size", config.eval.size, 0)
    _minimum("checkpoint.every", config.checkpoint.every, 0)
    _positive("checkpoint.keep_last", config.checkpoint.keep_last)
    _minimum("log.samples", config.log.samples, 0)
    _choice("moe.routing_replay", config.moe.routing_replay, ("off", "r2", "r3"))
    _choice("data.chat_template", config.data.chat_template, ("auto", "always", "never"))


def _choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        import difflib

        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.{hint}")


def _positive(key: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be positive")


def _minimum(key: str, value: int | float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _nearest_divisor(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))
