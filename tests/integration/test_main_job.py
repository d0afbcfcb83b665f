"""The main job (``gspo train`` with no arguments) on the embedded default: a real, seeded lift.

Slow (a few minutes on 2 cores): deselected by default, run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import pytest

from gspo.config import load_config
from gspo.trainer.run import train

pytestmark = pytest.mark.slow

MIN_LIFT = 0.15  # the bar: 15 points of held-out accuracy sampled at the training temperature


def test_default_run_lifts_held_out_accuracy_by_15_points(tmp_path):
    summary = train(load_config(None, ["log.progress=false", f"run_dir={tmp_path}"]), tmp_path)
    assert summary["lift/accuracy"] >= MIN_LIFT, summary
