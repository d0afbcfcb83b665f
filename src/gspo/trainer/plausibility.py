"""One warning each for values a run almost certainly did not mean (never an error: they may be on purpose).

- a learning rate far outside what RL fine-tuning uses: about 1e-7 to 1e-5 for billion-parameter models
  (TRL's GRPOConfig default is 1e-6), up to about 1e-3 for gspo's ~1M-parameter tiny models (default
  1e-4); ``optim.lr=1e5`` (a typo for 1e-5) wrecks the policy in its first step and the run ended at 0%
  without a word;
- a policy that moved further than a whole nat per token within one step (``kl/old_new`` > 1): a healthy
  update stays around 1e-4 to 1e-2; this is what too large a learning rate looks like from the inside;
- rewards that are exactly 0 at every step: :class:`gspo.trainer.trainer.ZeroSignalWatch` says so.
"""

from __future__ import annotations

import math

from gspo.config.schema import Config

LR_PLAUSIBLE = (1e-9, 1e-2)  # outside this, optim.lr is a typo far more often than an experiment
STEP_KL_LIMIT = 1.0  # kl/old_new (per token, within one step) above this: the update overshot
STEP_KL_KEY = "kl/old_new"


def config_warnings(config: Config) -> list[str]:
    """Warnings for implausible config values, one line each (printed once at the run's start)."""
    low, high = LR_PLAUSIBLE
    lr = config.optim.lr
    if lr > 0 and not low <= lr <= high:
        if lr > high:
            side, effect = "above", "the first updates may wreck the model"
        else:
            side, effect = "below", "the weights may barely change"
        fix = _typo_fix(lr)
        return [f"warning: optim.lr={lr:g} is far {side} what RL fine-tuning uses (about 1e-7 to 1e-3; the default "
                f"is {Config().optim.lr:g}); {effect}" + (f" (did you mean {fix}?)" if fix else "")]
    return []


def _typo_fix(lr: float) -> str | None:
    """``1e5`` -> ``optim.lr=1e-5``: the usual slip is a lost minus sign in the exponent."""
    exponent = math.floor(math.log10(lr))
    return f"optim.lr={lr / 10 ** exponent:g}e-{exponent}" if exponent > 0 else None


class StepWatch:
    """Looks at each step's metrics; a warning the first time the policy moves implausibly far in one step."""

    def __init__(self) -> None:
        self.warned = False

    def observe(self, step: int, metrics: dict) -> str | None:
        kl = metrics.get(STEP_KL_KEY)
        if self.warned or kl is None or not kl > STEP_KL_LIMIT:
            return None
        self.warned = True
        return (f"warning: {STEP_KL_KEY}={kl:.3g} at step {step}: one update moved the policy more than "
                f"{STEP_KL_LIMIT:g} nat per token from the one that sampled (healthy runs stay near 1e-4..1e-2); lower optim.lr or "
                "check the advantages (loss.advantage_scale)")
