"""DPPO, binary-TV and binary-KL variants (Qi et al., Rethinking the Trust Region in LLM Reinforcement
Learning, arXiv 2602.04879; reference code sail-sg/Stable-RL).

PPO's ratio clip is a poor trust region for LLMs: it over-constrains rare tokens (a tiny probability moving
a little is a huge ratio) and under-constrains likely ones. DPPO instead masks a token when a divergence
estimate between pi_old and pi_theta leaves the trust region *and* the update would push further out
(probability rising with A > 0, falling with A <= 0). The divergence is taken on the binary distribution
{sampled token, everything else}, which needs only the sampled token's two probabilities:
  binary TV:  p - q   (signed; out when p - q > delta_high for A > 0, or < -delta_low for A <= 0)
  binary KL:  q log(q / p) + (1 - q) log((1 - q) / (1 - p))  (out when > delta on the pushing side)
with p = pi_theta(y_t), q = pi_old(y_t). Kept tokens get the policy gradient with a detached importance
weight capped at `max_ratio` (the reference code's cap 10), token-mean over the step.
Defaults: delta = 0.2 (TV), 0.05 (KL), the values SkyRL's DPPO configuration recommends (the reference
code takes them through the PPO clip arguments).
The anchor is `old_logprobs`; the paper's main variant anchors at the rollout engine's probabilities,
which is this loss with the "bypass" correction (old_logprobs := rollout_logprobs).
"""

from __future__ import annotations

from numbers import Real

import torch

from gspo.algorithms.catalogue import PAPER_DEFAULTS
from gspo.algorithms._inputs import PolicyBatch, normaliser, prepare
from gspo.algorithms._masked import token_sum_mean
from gspo.algorithms._metrics import policy_metrics
from gspo.algorithms.kl import check_kl_args, reference_term
from gspo.algorithms.types import LossOutput

_TINY = 1e-12  # floor of 1 - p inside the binary KL's log, so p = 1 gives a large finite divergence, not inf


def binary_tv(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Signed binary total variation p - q of the sampled tokens, elementwise (|p - q| is the TV)."""
    return torch.exp(logprobs) - torch.exp(old_logprobs)


def binary_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(q) || Bernoulli(p)), q = exp(old_logprobs), p = exp(logprobs), elementwise, >= 0."""
    q = torch.exp(old_logprobs)
    not_p = (-torch.expm1(logprobs)).clamp_min(_TINY)  # 1 - p
    not_q = -torch.expm1(old_logprobs)  # 1 - q
    return q * (old_logprobs - logprobs) + torch.xlogy(not_q, not_q) - not_q * torch.log(not_p)


def _check(delta_low: float, delta_high: float, max_ratio: float) -> None:
    for name, value in (("delta_low", delta_low), ("delta_high", delta_high)):
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if not 1.0 <= max_ratio < float("inf"):
        raise ValueError(f"max_ratio must be finite and >= 1, got {max_ratio}")


def _masked_policy_gradient(
    batch: PolicyBatch, out_high: torch.Tensor, out_low: torch.Tensor, outside: torch.Tensor,
    max_ratio: float, n: torch.Tensor, beta: float, kl_estimator: str,
) -> LossOutput:
    """loss = -(1/N) sum_{i,t} M_{i,t} sg[min(w, max_ratio)] A logprobs, M = 0 where the update leaves the region.

    out_high / out_low: (B, T) bool, outside the region on the side A > 0 / A <= 0 pushes towards.
    """
    with torch.no_grad():
        ratio = torch.exp(batch.token_log_ratios())  # (B, T) w_{i,t}
        adv = batch.advantages_per_token()  # (B, T) or (B, 1)
        dropped = torch.where(adv > 0, out_high, out_low) & batch.mask  # (B, T)
        weight = torch.where(dropped, torch.zeros_like(ratio), ratio.clamp(max=max_ratio))  # (B, T)
    surrogate = weight * adv * batch.logprobs  # (B, T)
    policy = -token_sum_mean(batch.corrected(surrogate), batch.mask, n)

    high, low = dropped & (adv > 0), dropped & (adv < 0)  # (B, T)
    metrics = policy_metrics(batch, ratio=ratio, clipped_low=low, clipped_high=high, outside=outside & batch.mask)
    reference = reference_term(batch, kl_estimator, lambda kl: token_sum_mean(kl, batch.mask, n))
    return metrics.finish(batch, policy, reference, beta)


def dppo_tv_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta_low: float = PAPER_DEFAULTS["dppo_tv"]["delta_low"],
    delta_high: float = PAPER_DEFAULTS["dppo_tv"]["delta_high"],
    max_ratio: float = PAPER_DEFAULTS["dppo_tv"]["max_ratio"],
    num_tokens: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """DPPO-Binary-TV loss: policy gradient with the binary-TV trust-region mask.

    M_{i,t} = 0 if (A > 0 and p - q > delta_high) or (A <= 0 and p - q < -delta_low), else 1
    loss = -(1/N) sum_{i,t} M_{i,t} sg[min(w_{i,t}, max_ratio)] A_{i,t} logprobs[i, t]

    Gradient: -(1/N) M min(w, max_ratio) A per token. N = `num_tokens`; advantages (B,) or (B, T).
    `loss/clip_frac_*`: masked tokens; `ratio/outside_band_frac`: |p - q| beyond the region on either side.
    """
    _check(delta_low, delta_high, max_ratio)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, token_advantages=True,
                    correction=correction)
    n = normaliser(num_tokens, batch.token_count, "num_tokens")
    with torch.no_grad():
        tv = binary_tv(batch.logprobs, batch.old_logprobs)  # (B, T)
    out_high, out_low = tv > delta_high, tv < -delta_low
    return _masked_policy_gradient(batch, out_high, out_low, out_high | out_low, max_ratio, n, beta, kl_estimator)


def dppo_kl_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta_low: float = PAPER_DEFAULTS["dppo_kl"]["delta_low"],
    delta_high: float = PAPER_DEFAULTS["dppo_kl"]["delta_high"],
    max_ratio: float = PAPER_DEFAULTS["dppo_kl"]["max_ratio"],
    num_tokens: Real | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    correction: torch.Tensor | None = None,
) -> LossOutput:
    """DPPO-Binary-KL loss: policy gradient with the binary-KL trust-region mask.

    D_{i,t} = q log(q / p) + (1 - q) log((1 - q) / (1 - p)),  p = pi_theta(y_t), q = pi_old(y_t)
    M_{i,t} = 0 if (A > 0 and p > q and D > delta_high) or (A <= 0 and p < q and D > delta_low), else 1
    loss = -(1/N) sum_{i,t} M_{i,t} sg[min(w_{i,t}, max_ratio)] A_{i,t} logprobs[i, t]
    """
    _check(delta_low, delta_high, max_ratio)
    check_kl_args(ref_logprobs, beta, kl_estimator)
    batch = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, token_advantages=True,
                    correction=correction)
    n = normaliser(num_tokens, batch.token_count, "num_tokens")
    with torch.no_grad():
        kl = binary_kl(batch.logprobs, batch.old_logprobs)  # (B, T)
        rising = batch.logprobs > batch.old_logprobs  # (B, T) p > q
        falling = batch.logprobs < batch.old_logprobs
    out_high, out_low = (kl > delta_high) & rising, (kl > delta_low) & falling
    return _masked_policy_gradient(batch, out_high, out_low, out_high | out_low, max_ratio, n, beta, kl_estimator)
