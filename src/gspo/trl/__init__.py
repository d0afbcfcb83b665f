"""TRL's GRPO API on gspo: ``from gspo.trl import GRPOConfig, GRPOTrainer`` instead of ``from trl import ...``.

No TRL install is needed. ``GRPOConfig`` takes TRL's field names and defaults (:mod:`gspo.trl.config`),
:mod:`gspo.trl.mapping` turns them into gspo's config (warning where the semantics differ, refusing what
has no equivalent), and ``GRPOTrainer`` (:mod:`gspo.trl.trainer`) runs :class:`gspo.Trainer` with TRL's
reward signature, PEFT ``LoraConfig``, transformers callbacks and ``save_model``. docs/trl.md has the
table. The names load on first use, so ``import gspo.trl`` imports no torch.
"""

__all__ = ["GRPOConfig", "GRPOTrainer", "TRLCompatWarning"]


def __getattr__(name: str):
    if name == "GRPOConfig":
        from gspo.trl.config import GRPOConfig

        return GRPOConfig
    if name in ("GRPOTrainer", "TRLCompatWarning"):
        from gspo.trl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gspo.trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
