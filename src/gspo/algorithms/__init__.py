"""The objective family as pure functions of tensors (imports only torch, on first use).

Losses: `gspo_loss`, `gspo_token_loss`, `grpo_loss`, `dapo_loss`, `dr_grpo_loss`, `cispo_loss`,
`sapo_loss`, `gmpo_loss`, `dppo_tv_loss`, `dppo_kl_loss`, `luspo_loss`, each returning a `LossOutput`,
registered by name with their paper defaults in `OBJECTIVES` / `get_objective`. Rollout corrections
(engine vs trainer probabilities): `rollout_correction`, whose weights any loss takes as `correction=`.
Around them: `group_advantages`, `kl_penalty`, DAPO's `overlong_penalty` and `groups_with_signal`,
`reduce_metrics` to combine the metrics of several parts of one batch, and `in_support` (the tokens a
top-k / top-p support keeps, which every loss and correction uses).
"""

# name -> defining module; loaded on first use (PEP 562) so that `gspo.algorithms.catalogue` (names
# and paper defaults, read by config validation and --help) imports without torch.
_EXPORTS = {
    "reduce_metrics": "gspo.algorithms._metrics",
    "in_support": "gspo.algorithms._masked",
    "group_advantages": "gspo.algorithms.advantages",
    "cispo_loss": "gspo.algorithms.cispo",
    "CORRECTION_DEFAULTS": "gspo.algorithms.corrections",
    "CORRECTION_MODES": "gspo.algorithms.corrections",
    "Correction": "gspo.algorithms.corrections",
    "rollout_correction": "gspo.algorithms.corrections",
    "dapo_loss": "gspo.algorithms.dapo",
    "groups_with_signal": "gspo.algorithms.dapo",
    "overlong_penalty": "gspo.algorithms.dapo",
    "dppo_kl_loss": "gspo.algorithms.dppo",
    "dppo_tv_loss": "gspo.algorithms.dppo",
    "dr_grpo_loss": "gspo.algorithms.dr_grpo",
    "gmpo_loss": "gspo.algorithms.gmpo",
    "grpo_loss": "gspo.algorithms.grpo",
    "gspo_loss": "gspo.algorithms.gspo",
    "gspo_token_loss": "gspo.algorithms.gspo",
    "KL_ESTIMATORS": "gspo.algorithms.kl",
    "kl_penalty": "gspo.algorithms.kl",
    "luspo_loss": "gspo.algorithms.luspo",
    "OBJECTIVES": "gspo.algorithms.registry",
    "Objective": "gspo.algorithms.registry",
    "get_objective": "gspo.algorithms.registry",
    "sapo_loss": "gspo.algorithms.sapo",
    "MAX_LOG_RATIO": "gspo.algorithms.types",
    "LossOutput": "gspo.algorithms.types",
}

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
    "in_support",
    "grpo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "kl_penalty",
    "overlong_penalty",
    "reduce_metrics",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gspo.algorithms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
