"""The objectives by name, each with its paper's defaults: the one table the trainer, config validation
and `--help` read.

Every registered loss takes `(logprobs, old_logprobs, advantages, mask, *, <hyperparameters>,
<normaliser>=None, ref_logprobs=None, beta=0.0, kl_estimator="k3", correction=None)`; the objectives that
need the generation budget also take `max_length` (see `Objective.needs_max_length`). The defaults listed
in `hyperparameters` are read from the loss functions' own signatures, so each constant lives once.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from gspo.algorithms.cispo import cispo_loss
from gspo.algorithms.dapo import dapo_loss
from gspo.algorithms.dppo import dppo_kl_loss, dppo_tv_loss
from gspo.algorithms.dr_grpo import dr_grpo_loss
from gspo.algorithms.gmpo import gmpo_loss
from gspo.algorithms.grpo import grpo_loss
from gspo.algorithms.gspo import gspo_loss, gspo_token_loss
from gspo.algorithms.luspo import luspo_loss
from gspo.algorithms.sapo import sapo_loss
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
    needs_max_length: bool = False  # the loss takes `max_length`: the trainer passes rollout max_new_tokens


def _objective(name: str, loss: Callable[..., LossOutput], normaliser: str, names: tuple[str, ...], *,
               paper: str, summary: str, dynamic_sampling: bool = False, token_advantages: bool = False,
               needs_max_length: bool = False) -> Objective:
    """An Objective whose hyperparameter defaults are read from `loss`'s signature."""
    params = inspect.signature(loss).parameters
    missing = [k for k in (*names, normaliser, *COMMON_KEYWORDS) if k not in params]
    if missing:
        raise TypeError(f"{loss.__name__} lacks keywords {missing}")
    defaults = MappingProxyType({k: float(params[k].default) for k in names})
    return Objective(name=name, loss=loss, normaliser=normaliser, hyperparameters=defaults,
                     dynamic_sampling=dynamic_sampling, token_advantages=token_advantages, paper=paper,
                     summary=summary, needs_max_length=needs_max_length)


_CLIP = ("clip_low", "clip_high")
_DELTAS = ("delta_low", "delta_high", "max_ratio")

OBJECTIVES: Mapping[str, Objective] = MappingProxyType({o.name: o for o in (
    _objective("gspo", gspo_loss, "num_sequences", _CLIP,
               paper="Zheng et al., GSPO, arXiv 2507.18071, eq. 5-7",
               summary="sequence ratio (geometric mean), sequence clip, mean over responses"),
    _objective("gspo_token", gspo_token_loss, "num_sequences", _CLIP, token_advantages=True,
               paper="Zheng et al., GSPO, arXiv 2507.18071, eq. 13-14",
               summary="GSPO with per-token advantages (value of s_i, gradient of a token ratio)"),
    _objective("grpo", grpo_loss, "num_sequences", _CLIP,
               paper="Shao et al., DeepSeekMath, arXiv 2402.03300; GSPO paper eq. 1-2",
               summary="token ratio and clip, token-mean per response, mean over responses"),
    _objective("dapo", dapo_loss, "num_tokens", _CLIP, dynamic_sampling=True,
               paper="Yu et al., DAPO, arXiv 2503.14476, section 3",
               summary="clip-higher token ratio, token-mean over the step, dynamic sampling"),
    _objective("dr_grpo", dr_grpo_loss, "num_sequences", _CLIP, token_advantages=True, needs_max_length=True,
               paper="Liu et al., Understanding R1-Zero-Like Training (Dr. GRPO), arXiv 2503.20783",
               summary="GRPO's token surrogate summed over a constant responses x max_length"),
    _objective("cispo", cispo_loss, "num_tokens", _CLIP, token_advantages=True,
               paper="MiniMax-M1, arXiv 2506.13585, eq. 4-5",
               summary="detached truncated IS weight times A log pi, token-mean; no token loses its gradient"),
    _objective("sapo", sapo_loss, "num_sequences", ("tau_pos", "tau_neg"), token_advantages=True,
               paper="Gao et al., Soft Adaptive Policy Optimization, arXiv 2511.20347",
               summary="soft sigmoid gate of the token ratio instead of a hard clip"),
    _objective("gmpo", gmpo_loss, "num_sequences", _CLIP,
               paper="Zhao et al., Geometric-Mean Policy Optimization, arXiv 2507.20673, eq. 4",
               summary="geometric mean of token ratios clipped in log space (e^-0.4, e^0.4)"),
    _objective("dppo_tv", dppo_tv_loss, "num_tokens", _DELTAS, token_advantages=True,
               paper="Qi et al., Rethinking the Trust Region in LLM RL (DPPO), arXiv 2602.04879",
               summary="policy gradient masked where the binary TV leaves the trust region"),
    _objective("dppo_kl", dppo_kl_loss, "num_tokens", _DELTAS, token_advantages=True,
               paper="Qi et al., Rethinking the Trust Region in LLM RL (DPPO), arXiv 2602.04879",
               summary="policy gradient masked where the binary KL leaves the trust region"),
    _objective("luspo", luspo_loss, "num_sequences", _CLIP,
               paper="Liu et al., Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261",
               summary="GSPO with each response's surrogate weighted by its length"),
)})


def get_objective(name: str) -> Objective:
    """The registered objective `name`; ValueError naming the allowed names and the closest match."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), OBJECTIVES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown objective {name!r}: allowed {', '.join(OBJECTIVES)}{hint}") from None
