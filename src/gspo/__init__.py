"""gspo: GSPO, GSPO-token, GRPO, DAPO and the post-GSPO objectives for fine-tuning causal LMs.

The package root re-exports the Python training API (`gspo.Trainer`, see `gspo.api`) and the pure
objective functions of `gspo.algorithms`, which import nothing but torch. Everything else (models, rollout, trainer, distributed) is imported explicitly by
its users, so `import gspo` stays light: no transformers, no torch.distributed of its own. The
re-exports load on first use (PEP 562), so `import gspo.cli` answers `gspo --help` without torch.
"""

__version__ = "0.1.0"

__all__ = [
    "Trainer",
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


def __getattr__(name: str):
    if name == "Trainer":  # the Python training API (gspo.api), loaded on first use
        from gspo.api import Trainer

        return Trainer
    if name in __all__:
        import gspo.algorithms

        return getattr(gspo.algorithms, name)
    raise AttributeError(f"module 'gspo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
