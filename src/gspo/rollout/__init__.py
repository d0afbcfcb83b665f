"""Rollout engines: turn prompts into sampled completions with the sampler's log-probabilities."""

from gspo.rollout.base import Rollout, RolloutEngine, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams"]
