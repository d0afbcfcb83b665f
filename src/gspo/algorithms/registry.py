"""The objectives by name, each with its loss function and its paper's defaults.

The names, normalisers and defaults are declared once, torch-free, in :mod:`gspo.algorithms.catalogue`
(what config validation and ``--help`` read); this module joins them to the loss functions.

Every registered loss takes `(logprobs, old_logprobs, advantages, mask, *, <hyperparameters>,
<normaliser>=None, ref_logprobs=None, beta=0.0, kl_estimator="k3", correction=None)`; the objectives that
need the generation budget also take `max_length` (see `Objective.needs_max_length`). The defaults listed
in `hyperparameters` are read from the loss functions' own signatures (which take them from the
catalogue), so each constant lives once.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from gspo.algorithms.catalogue import SPECS, ObjectiveSpec
from gspo.algorithms.types import LossOutput

NORMALISERS = ("num_sequences", "num_tokens")
# Keywords every loss takes besides its hyperparameters and normaliser (not tunable per objective).
COMMON_KEYWORDS = ("ref_logprobs", "beta", "kl_estimator", "correction")


@dataclass(frozen=True)
class Objective:
    """One objective: its loss function and what the trainer must know to call it."""

    name: str
    loss: Callable[..., LossOutput]
    normaliser: str  # "num_sequences" (responses with >= 1 token) or "num_tokens" (response tokens), global
    hyperparameters: Mapping[str, float]  # keyword -> paper default; the only tunable keywords
    dynamic_sampling: bool  # default for DAPO-style dynamic sampling (drop groups with equal rewards)
    token_advantages: bool  # accepts (B, T) per-token advantages besides (B,)
    paper: str  # one-line citation
    summary: str  # one line for --help
    needs_max_length: bool = False  # the loss takes `max_length`: the trainer passes the response budget
    advantage_scale: str = "group"  # the paper's advantage scale (group, batch or none)


def _objective(name: str, loss: Callable[..., LossOutput], normaliser: str, names: tuple[str, ...], *,
               paper: str, summary: str, dynamic_sampling: bool = False, token_advantages: bool = False,
               needs_max_length: bool = False, advantage_scale: str = "group") -> Objective:
    """An Objective whose hyperparameter defaults are read from `loss`'s signature."""
    params = inspect.signature(loss).parameters
    missing = [k for k in (*names, normaliser, *COMMON_KEYWORDS) if k not in params]
    if missing:
        raise TypeError(f"{loss.__name__} lacks keywords {missing}")
    defaults = MappingProxyType({k: float(params[k].default) for k in names})
    return Objective(name=name, loss=loss, normaliser=normaliser, hyperparameters=defaults,
                     dynamic_sampling=dynamic_sampling, token_advantages=token_advantages, paper=paper,
                     summary=summary, needs_max_length=needs_max_length, advantage_scale=advantage_scale)


def _from_spec(spec: ObjectiveSpec) -> Objective:
    module, _, function = spec.function.partition(":")
    return _objective(spec.name, getattr(importlib.import_module(module), function), spec.normaliser,
                      tuple(spec.hyperparameters), paper=spec.paper, summary=spec.summary,
                      dynamic_sampling=spec.dynamic_sampling, token_advantages=spec.token_advantages,
                      needs_max_length=spec.needs_max_length, advantage_scale=spec.advantage_scale)


OBJECTIVES: Mapping[str, Objective] = MappingProxyType({name: _from_spec(spec) for name, spec in SPECS.items()})


def get_objective(name: str) -> Objective:
    """The registered objective `name`; ValueError naming the allowed names and the closest match."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), OBJECTIVES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown objective {name!r}: allowed {', '.join(OBJECTIVES)}{hint}") from None
