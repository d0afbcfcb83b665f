"""The objective family as pure functions of tensors (imports only torch).

Losses: `gspo_loss`, `gspo_token_loss`, `grpo_loss`, `dapo_loss`, each returning a `LossOutput`.
Around them: `group_advantages`, `kl_penalty`, DAPO's `overlong_penalty` and `groups_with_signal`,
and `reduce_metrics` to combine the metrics of several parts of one batch.
"""

from gspo.algorithms._metrics import reduce_metrics
from gspo.algorithms.advantages import group_advantages
from gspo.algorithms.dapo import dapo_loss, groups_with_signal, overlong_penalty
from gspo.algorithms.grpo import grpo_loss
from gspo.algorithms.gspo import gspo_loss, gspo_token_loss
from gspo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from gspo.algorithms.types import MAX_LOG_RATIO, LossOutput

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
