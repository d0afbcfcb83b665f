"""The objectives and rollout corrections by name, with their papers' defaults: imports nothing.

This is where each constant lives once. The loss functions take their keyword defaults from
:data:`PAPER_DEFAULTS`, :mod:`gspo.algorithms.registry` joins these entries to the loss functions
(importing torch), and config validation and ``gspo train --help`` read the allowed names and defaults
from here without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective, as the trainer and the config see it (the loss itself: :mod:`~gspo.algorithms.registry`)."""

    name: str
    function: str  # "module:function" of the loss
    normaliser: str  # "num_sequences" (responses with >= 1 token) or "num_tokens" (response tokens), global
    hyperparameters: Mapping[str, float]  # keyword -> paper default; the only tunable keywords
    paper: str  # one-line citation
    summary: str  # one line for --help
    dynamic_sampling: bool = False  # default for DAPO-style dynamic sampling (drop groups with equal rewards)
    token_advantages: bool = False  # accepts (B, T) per-token advantages besides (B,)
    needs_max_length: bool = False  # the loss takes `max_length`: the trainer passes the response budget
    advantage_scale: str = "group"  # the paper's advantage scale (one of ADVANTAGE_SCALES): what `auto` resolves to


def _spec(name: str, function: str, normaliser: str, hyperparameters: dict[str, float], **rest) -> ObjectiveSpec:
    return ObjectiveSpec(name, f"gspo.algorithms.{function}", normaliser, MappingProxyType(hyperparameters), **rest)


# GSPO: paper section 5.1. GRPO: DeepSeekMath's symmetric 0.2 (the GSPO paper's GRPO baseline used
# 0.2 / 0.27). DAPO: clip-higher 0.2 / 0.28. CISPO keeps the IS weight in [1 - 1, 1 + 3] = [0, 4]
# (MiniMax-M1 publishes no upper bound; ScaleRL's cap). GMPO clips log-ratios to (-0.4, 0.4). SAPO's
# temperatures and DPPO's trust-region deltas are their papers' (docs/objectives.md has each source).
# Advantage scale: eq. 6's group std for every objective but Dr. GRPO, which drops the std division
# (its "question-level difficulty bias", arXiv 2503.20783 section 3.1). GRPO, DAPO, GSPO (eq. 6),
# CISPO (MiniMax-M1: GRPO's group-relative advantage), SAPO, GMPO and LUSPO (GSPO's) define A_i with the
# group std; DPPO's code is a verl fork whose default keeps it (verl `norm_adv_by_std_in_grpo=True`).
SPECS: Mapping[str, ObjectiveSpec] = MappingProxyType({s.name: s for s in (
    _spec("gspo", "gspo:gspo_loss", "num_sequences", {"clip_low": 3e-4, "clip_high": 4e-4},
          paper="Zheng et al., GSPO, arXiv 2507.18071, eq. 5-7",
          summary="sequence ratio (geometric mean), sequence clip, mean over responses"),
    _spec("gspo_token", "gspo:gspo_token_loss", "num_sequences", {"clip_low": 3e-4, "clip_high": 4e-4},
          token_advantages=True, paper="Zheng et al., GSPO, arXiv 2507.18071, eq. 13-14",
          summary="GSPO with per-token advantages (value of s_i, gradient of a token ratio)"),
    _spec("grpo", "grpo:grpo_loss", "num_sequences", {"clip_low": 0.2, "clip_high": 0.2},
          paper="Shao et al., DeepSeekMath, arXiv 2402.03300; GSPO paper eq. 1-2",
          summary="token ratio and clip, token-mean per response, mean over responses"),
    _spec("dapo", "dapo:dapo_loss", "num_tokens", {"clip_low": 0.2, "clip_high": 0.28}, dynamic_sampling=True,
          paper="Yu et al., DAPO, arXiv 2503.14476, section 3",
          summary="clip-higher token ratio, token-mean over the step, dynamic sampling"),
    _spec("dr_grpo", "dr_grpo:dr_grpo_loss", "num_sequences", {"clip_low": 0.2, "clip_high": 0.2},
          token_advantages=True, needs_max_length=True, advantage_scale="none",
          paper="Liu et al., Understanding R1-Zero-Like Training (Dr. GRPO), arXiv 2503.20783",
          summary="GRPO's token surrogate summed over a constant responses x max_length"),
    _spec("cispo", "cispo:cispo_loss", "num_tokens", {"clip_low": 1.0, "clip_high": 3.0}, token_advantages=True,
          paper="MiniMax-M1, arXiv 2506.13585, eq. 4-5",
          summary="detached truncated IS weight times A log pi, token-mean; no token loses its gradient"),
    _spec("sapo", "sapo:sapo_loss", "num_sequences", {"tau_pos": 1.0, "tau_neg": 1.05}, token_advantages=True,
          paper="Gao et al., Soft Adaptive Policy Optimization, arXiv 2511.20347",
          summary="soft sigmoid gate of the token ratio instead of a hard clip"),
    _spec("gmpo", "gmpo:gmpo_loss", "num_sequences", {"clip_low": 0.4, "clip_high": 0.4},
          paper="Zhao et al., Geometric-Mean Policy Optimization, arXiv 2507.20673, eq. 4",
          summary="geometric mean of token ratios clipped in log space (e^-0.4, e^0.4)"),
    _spec("dppo_tv", "dppo:dppo_tv_loss", "num_tokens", {"delta_low": 0.2, "delta_high": 0.2, "max_ratio": 10.0},
          token_advantages=True, paper="Qi et al., Rethinking the Trust Region in LLM RL (DPPO), arXiv 2602.04879",
          summary="policy gradient masked where the binary TV leaves the trust region"),
    _spec("dppo_kl", "dppo:dppo_kl_loss", "num_tokens", {"delta_low": 0.05, "delta_high": 0.05, "max_ratio": 10.0},
          token_advantages=True, paper="Qi et al., Rethinking the Trust Region in LLM RL (DPPO), arXiv 2602.04879",
          summary="policy gradient masked where the binary KL leaves the trust region"),
    _spec("luspo", "luspo:luspo_loss", "num_sequences", {"clip_low": 3e-4, "clip_high": 4e-4},
          paper="Liu et al., Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261",
          summary="GSPO with each response's surrogate weighted by its length"),
)})

# name -> {keyword: paper default}: what the loss functions' signatures take their defaults from.
PAPER_DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {name: spec.hyperparameters for name, spec in SPECS.items()})

# Rollout corrections (gspo.algorithms.corrections): mode -> {threshold keyword: default}, the only
# keywords each mode accepts. TIS truncates at 2; IcePop's token band is [0.5, 5]; the geometric
# (length-normalised) bands are 1 +- 1% because a geometric mean moves far less than a product.
CORRECTION_DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "none": {}, "bypass": {},
    "tis": {"threshold": 2.0},
    "mis": {"low": 0.5, "high": 5.0},
    "seq_tis": {"threshold": 2.0},
    "seq_mis": {"low": 0.5, "high": 2.0},
    "geo_tis": {"threshold": 2.0},
    "geo_mis": {"low": 0.99, "high": 1.01},
    "geo_reject": {"low": 0.99, "high": 1.01},
    "opsm": {"delta": 1e-4},
})
CORRECTION_MODES = tuple(CORRECTION_DEFAULTS)

# Advantage scales of eq. 6 (gspo.algorithms.advantages): the group's std, the whole batch's, or none.
ADVANTAGE_SCALES = ("group", "batch", "none")

# KL estimators of the reference term (Schulman's k1 / k2 / k3; k3 is DeepSeekMath's).
KL_ESTIMATORS = ("k1", "k2", "k3")
