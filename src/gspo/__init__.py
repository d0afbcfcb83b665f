"""gspo: GSPO, GSPO-token, GRPO and DAPO fine-tuning of causal LMs.

The package root re-exports only the pure objective functions of `gspo.algorithms`, which import
nothing but torch. Everything else (models, rollout, trainer, distributed) is imported explicitly by
its users, so `import gspo` stays light: no transformers, no torch.distributed of its own.
"""

from gspo.algorithms import (
    KL_ESTIMATORS,
    MAX_LOG_RATIO,
    LossOutput,
    dapo_loss,
    group_advantages,
    groups_with_signal,
    grpo_loss,
    gspo_loss,
    gspo_token_loss,
    kl_penalty,
    overlong_penalty,
    reduce_metrics,
)

__version__ = "0.1.0"

__all__ = [
    "KL_ESTIMATORS",
    "MAX_LOG_RATIO",
    "LossOutput",
    "dapo_loss",
    "group_advantages",
    "groups_with_signal",
    "grpo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "kl_penalty",
    "overlong_penalty",
    "reduce_metrics",
]
