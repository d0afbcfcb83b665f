"""The KL reference is taken over the policy's top-k / top-p support (review D9).

The policy's log-probabilities are those of the truncated, renormalised distribution the sampler drew
from; a reference over the full vocabulary differs from them by log(kept mass) even where policy and
reference are the same model, so kl/ref had a floor (7.3e-3 at top_p 0.8 on the tiny-arith run; here,
on a random tiny model with flat distributions, 0.017 / 0.63 / 0.36 for the three settings below).
"""

from __future__ import annotations

import pytest

from gspo.config import load_config
from gspo.trainer.trainer import Trainer


def on_policy_kl(overrides, *extra) -> float:
    """kl/ref of one on-policy minibatch (theta = theta_old = the reference), GRPO with beta 0.04."""
    config = load_config(None, [*overrides, "algorithm=grpo", "loss.beta=0.04", "optim.minibatches=1",
                                "rollout.temperature=0.7", *extra])
    return Trainer.from_config(config, run_dir=None).train_step()["kl/ref"]


@pytest.mark.parametrize("truncation", [("rollout.top_p=0.8",), ("rollout.top_k=3",),
                                        ("rollout.top_k=5", "rollout.top_p=0.9")])
def test_kl_to_the_reference_is_zero_while_the_policy_is_the_reference(tiny_overrides, truncation):
    """The training forward and the reference pass compute the same numbers (one forward each, same
    kernels): exactly 0."""
    assert on_policy_kl(tiny_overrides, "optim.share_prompts=false", *truncation) == 0.0


def test_with_shared_prompts_only_float_rounding_is_left(tiny_overrides):
    """The training forward runs each prompt once (KV cache), the reference pass one plain forward: the
    hidden states differ by float rounding, kl/ref by ~1e-15."""
    assert on_policy_kl(tiny_overrides, "rollout.top_k=5", "rollout.top_p=0.9") < 1e-12
