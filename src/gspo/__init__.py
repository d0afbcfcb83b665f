"""gspo: GSPO, GSPO-token, GRPO, DAPO and the post-GSPO objectives for fine-tuning causal LMs.

The package root re-exports the Python training API (`gspo.Trainer`, see `gspo.api`) and the pure
objective functions of `gspo.algorithms`, which import nothing but torch. Everything else (models,
rollout, trainer, distributed) is imported explicitly by its users, so `import gspo` stays light: no transformers, no torch.distributed of its own. The
re-exports load on first use (PEP 562), so `import gspo.cli` answers `gspo --help` without torch.
"""

__version__ = "0.1.0"

from gspo.algorithms import __all__ as _ALGORITHMS  # the package's name table only: no torch until used

__all__ = ["Trainer", *_ALGORITHMS]


def __getattr__(name: str):
    if name == "Trainer":  # the Python training API (gspo.api), loaded on first use
        from gspo.api import Trainer

        return Trainer
    if name in _ALGORITHMS:
        import gspo.algorithms

        return getattr(gspo.algorithms, name)
    raise AttributeError(f"module 'gspo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
