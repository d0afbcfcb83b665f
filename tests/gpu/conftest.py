"""The GPU tier: every test here needs CUDA and is reported "skipped: no CUDA" without it, never "passed".

One command on a GPU machine (under 8 minutes on one recent GPU):

    python -m pytest tests/gpu -m gpu -rs -s

(``-s`` shows the throughput lines printed for the record; the vLLM tests also need the official
``vllm`` installed: ``pip install "gspo[vllm]"``.)
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        if not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="no CUDA"))
        elif item.get_closest_marker("two_gpus") and torch.cuda.device_count() < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 GPUs, found {torch.cuda.device_count()}"))
        elif item.get_closest_marker("needs_vllm") and importlib.util.find_spec("vllm") is None:
            item.add_marker(pytest.mark.skip(reason="vllm is not installed (pip install 'gspo[vllm]')"))


@pytest.fixture(autouse=True)
def _cuda_only(request):
    """Belt and braces: a gpu test that somehow runs without CUDA fails instead of passing."""
    if request.node.get_closest_marker("gpu") is not None and not HAS_CUDA:
        pytest.fail("a gpu-tier test ran without CUDA")
