"""The objective family as pure functions of tensors (imports only torch).

Losses: `gspo_loss`, `gspo_token_loss`, `grpo_loss`, `dapo_loss`, `dr_grpo_loss`, `cispo_loss`,
`sapo_loss`, `gmpo_loss`, `dppo_tv_loss`, `dppo_kl_loss`, `luspo_loss`, each returning a `LossOutput`,
registered by name with their paper defaults in `OBJECTIVES` / `get_objective`. Rollout corrections
(engine vs trainer probabilities): `rollout_correction`, whose weights any loss takes as `correction=`.
Around them: `group_advantages`, `kl_penalty`, DAPO's `overlong_penalty` and `groups_with_signal`,
and `reduce_metrics` to combine the metrics of several parts of one batch.
"""

from gspo.algorithms._metrics import reduce_metrics
from gspo.algorithms.advantages import group_advantages
from gspo.algorithms.cispo import cispo_loss
from gspo.algorithms.corrections import CORRECTION_DEFAULTS, CORRECTION_MODES, Correction, rollout_correction
from gspo.algorithms.dapo import dapo_loss, groups_with_signal, overlong_penalty
from gspo.algorithms.dppo import dppo_kl_loss, dppo_tv_loss
from gspo.algorithms.dr_grpo import dr_grpo_loss
from gspo.algorithms.gmpo import gmpo_loss
from gspo.algorithms.grpo import grpo_loss
from gspo.algorithms.gspo import gspo_loss, gspo_token_loss
from gspo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from gspo.algorithms.luspo import luspo_loss
from gspo.algorithms.registry import OBJECTIVES, Objective, get_objective
from gspo.algorithms.sapo import sapo_loss
from gspo.algorithms.types import MAX_LOG_RATIO, LossOutput

__all__ = [
    "CORRECTION_DEFAULTS",
    "CORRECTION_MODES",
    "Correction",
    "OBJECTIVES",
    "Objective",
    "cispo_loss",
    "dppo_kl_loss",
    "dppo_tv_loss",
    "dr_grpo_loss",
    "get_objective",
    "gmpo_loss",
    "luspo_loss",
    "rollout_correction",
    "sapo_loss",
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
