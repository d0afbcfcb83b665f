"""What engines declare about their log-probabilities, and how ``loss.old_logprobs=auto`` reads it."""

from __future__ import annotations

import pytest

from gspo.rollout.vllm.server import VLLMServerEngine
from gspo.trainer.old_logprobs import plan_old_logprobs


def plan(setting: str, info):
    return plan_old_logprobs(setting, engine=info, training_dtype="float32", dropout=False, moe=False)


@pytest.mark.parametrize("dtype, source", [("float32", "rollout"), ("bfloat16", "recompute"),
                                           ("float16", "recompute"), (None, "recompute")])
def test_vllm_server_logprobs_are_pi_old_only_for_a_float32_server(monkeypatch, dtype, source):
    """A server gspo starts in float32 samples the float32 policy (auto takes its log-probabilities); a
    bfloat16 / float16 one, or one at rollout.server_url (dtype None: unknown), leaves auto recomputing."""
    monkeypatch.setattr(VLLMServerEngine, "_get", lambda self, path: {"version": "0.32.0"})  # no server needed
    engine = VLLMServerEngine("http://127.0.0.1:8000", pad_token_id=0, eos_ids=[1], dtype=dtype)
    try:
        info = engine.info
    finally:
        engine.close()
    assert info.behaviour_logprobs == (dtype == "float32") and not info.exact_logprobs
    assert plan("auto", info).source == source
    assert (dtype or "dtype unknown") in info.name  # shown in the run's start line
    assert plan("rollout", info).source == "rollout"  # an explicit choice is still honoured
