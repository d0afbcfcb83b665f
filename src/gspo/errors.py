"""The errors gspo raises on purpose, one type per kind of problem.

Every message names the problem and the fix (which key, file or value; what to change). Catch
:class:`GspoError` to handle all of them; the ``ValueError`` bases keep ``except ValueError`` working
for bad configuration and bad data.
"""

from __future__ import annotations


class GspoError(Exception):
    """Base class of every error gspo raises deliberately."""


class ConfigError(GspoError, ValueError):
    """A configuration key is unknown, missing, of the wrong type or out of range."""


class DataError(GspoError, ValueError):
    """A dataset, prompt or record is malformed (missing field, empty prompt, bad format)."""


class RewardError(GspoError):
    """A reward function failed or returned something that is not a finite number."""


class ModelLoadError(GspoError):
    """A model or tokenizer could not be loaded (missing files, unknown architecture, bad dtype)."""


class CheckpointError(GspoError):
    """A checkpoint cannot be written or read: corrupt, incomplete, or not matching the model."""


class TrainingDiverged(GspoError):
    """Training produced non-finite losses or gradients; the last good checkpoint is kept."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GspoError",
    "ModelLoadError",
    "RewardError",
    "TrainingDiverged",
]


class RunInterrupted(GspoError, KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after saving a checkpoint (the message says how to resume).

    A KeyboardInterrupt too, so a notebook cell stops as users expect; the CLI exits with ``exit_code``
    (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, *, exit_code: int, run_dir=None) -> None:
        super().__init__(message)
        self.exit_code, self.run_dir = exit_code, run_dir
