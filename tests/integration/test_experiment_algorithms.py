"""`gspo experiment algorithms` runs end to end in its quick setting and says what did and did not reproduce."""

from __future__ import annotations

import json

import pytest

from gspo.cli import main
from gspo.experiments.algorithms import claims, parse_options


def test_quick_study_writes_a_report_with_verdicts(tmp_path):
    assert main(["experiment", "algorithms", "quick=true", f"out={tmp_path}"]) == 0
    report = (tmp_path / "report.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"gspo", "grpo", "gspo+bf16/none", "gspo+bf16/tis"}
    assert "| gspo |" in report and "What reproduced" in report and "cores" in report  # the machine is named
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert any(k.startswith("correction/") for r in results["runs"] if r["correction"] == "tis" for s in r["steps"]
               for k in s)


def test_options_are_checked():
    with pytest.raises(Exception, match="not one of"):
        parse_options(["algorithms=gspo,gpro"])
    with pytest.raises(Exception, match="unknown option"):
        parse_options(["stepz=3"])
    assert parse_options(["algorithms=cispo,sapo", "seeds=3"]).algorithms == ("cispo", "sapo")


def test_claims_say_plainly_when_a_claim_does_not_reproduce():
    row = dict(seeds=3, correction=None, final_min=0.5, final_max=0.6, final_accuracy=0.55)
    summary = {"gspo": {**row, "clip_frac": 0.02}, "grpo": {**row, "clip_frac": 0.01, "final_min": 0.7,
                                                            "final_max": 0.8, "final_accuracy": 0.75}}
    text = " ".join(claims(summary))
    assert "2x - not reproduced" in text and "not reproduced (GRPO ahead)" in text
