"""What a new user meets in the first hour: resolved config.json, a finished run's resume, early data
errors, evaluation that scores like training."""

from __future__ import annotations

import json

import pytest

from gspo.cli import main
from gspo.config import load_config
from gspo.errors import DataError, RewardError


def test_config_json_records_the_values_used_and_a_finished_run_resumes_to_nothing(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides, "algorithm=dapo", f"run_dir={run}"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["loss"]["clip_low"], saved["loss"]["clip_high"]) == (0.2, 0.28)  # DAPO's, not null
    assert saved["loss"]["dynamic_sampling"] is True
    lines = (run / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished 2 of 2 steps; nothing to do" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text().splitlines() == lines  # nothing re-evaluated or appended


def test_a_missing_data_file_is_reported_before_any_model_loads(tmp_path, tiny_overrides, monkeypatch):
    import gspo.trainer.build as build

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(build, "_load_policy", no_model)
    from gspo.trainer.trainer import Trainer

    with pytest.raises(DataError, match="does not exist"):
        Trainer.from_config(load_config(None, [*tiny_overrides, f"data.path={tmp_path / 'missing.jsonl'}"]))


def test_evaluation_honours_none_policy_and_sees_the_training_prompt(tiny_model_dir, reward_module):
    from gspo.trainer.build import build_evaluation

    config = load_config(None, [f"model={tiny_model_dir}", f"reward.functions={reward_module}:nothing",
                                "reward.none_policy=error", "eval.size=4"])
    parts = build_evaluation(config)
    with pytest.raises(RewardError, match="None"):
        parts.evaluator.evaluate(parts.task.eval_rows, temperature=1.0)


def test_an_implausible_learning_rate_is_run_with_one_warning(tmp_path, tiny_overrides, capsys):
    """optim.lr=1e5 (a typo for 1e-5) was accepted without a word and ended at 0%."""
    from gspo.cli import main

    overrides = [o for o in tiny_overrides if not o.startswith("optim.lr=")]
    assert main(["train", *overrides, "optim.lr=1e5", "steps=1", f"run_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: optim.lr=100000 is far above") == 1 and "did you mean optim.lr=1e-5?" in err
