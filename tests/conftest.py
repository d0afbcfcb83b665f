"""Shared fixtures: tiny models built in the test session (nothing is downloaded)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and results stay bit-exact

REWARD_MODULE = textwrap.dedent(
    '''
    """Test rewards with a signal even for a random model."""

    def ones(prompt, completion, **row):
        return completion.count("1") / 4.0

    def boom(prompt, completion, **row):
        raise RuntimeError("reward exploded")

    def nothing(prompt, completion, **row):
        return None

    def nan(prompt, completion, **row):
        return float("nan")

    def text(prompt, completion, **row):
        return "high"
    '''
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised ~50k-parameter Qwen3 with the character tokenizer, saved to disk."""
    from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reward_module(tmp_path_factory) -> str:
    """Name of an importable module with test rewards (``<name>:ones`` etc.)."""
    path = tmp_path_factory.mktemp("rewards")
    (path / "gspo_test_rewards.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(path))
    return "gspo_test_rewards"


@pytest.fixture
def tiny_overrides(tiny_model_dir, reward_module) -> list[str]:
    """Config overrides for a seconds-long run on the tiny random model."""
    return [f"model={tiny_model_dir}", f"reward.functions={reward_module}:ones", "steps=2",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "optim.minibatches=2", "optim.lr=1e-3", "eval.size=8", "log.progress=false", "log.tensorboard=false",
            "checkpoint.every=0"]


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen3-MoE (8 experts, top-2) with the character tokenizer."""
    from gspo.models.tiny import build_char_tokenizer
    from gspo.models.tiny_moe import build_tiny_qwen3_moe

    path = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3_moe(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                 moe_intermediate_size=16, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
