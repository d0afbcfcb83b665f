"""`gspo experiment moe-stability` end to end in its quick setting, plus the study's own arithmetic."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from gspo.cli import main
from gspo.errors import ConfigError
from gspo.experiments.logratio_bins import LogRatioBins
from gspo.experiments.moe_stability import parse_options
from gspo.experiments.volatility_depth import partial_credit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One quick run on the embedded tiny MoE, one seed, in-process (workers=1)."""
    out = tmp_path_factory.mktemp("moe-stability")
    assert main(["experiment", "moe-stability", "quick=true", "seeds=1", "workers=1", f"out={out}"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_study_writes_report_and_plots(study):
    out, _ = study
    for name in ("curves", "clipping", "volatility", "logratio_length", "precision"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
    report = (out / "report.md").read_text()
    for label in ("GSPO", "GRPO", "GRPO + Routing Replay (R2)", "bf16", "What reproduces"):
        assert label in report
    assert len(re.findall(r"\d+\.\d+%", report)) > 20  # tables hold numbers, not placeholders
    for name in ("gspo", "grpo", "grpo_r2", "gspo_bf16", "grpo_bf16"):
        assert (out / "runs" / f"{name}-seed0" / "metrics.jsonl").exists()


def test_quick_study_numbers_are_consistent(study):
    _, results = study
    arms = results["arms"]
    assert set(arms) == {"gspo", "grpo", "grpo_r2", "gspo_bf16", "grpo_bf16"}
    for arm in arms.values():
        assert 0.0 <= arm["clip"]["offpolicy"]["mean"] <= 1.0
        assert len(arm["reward"]["mean"]) == results["options"]["steps"]
    # Recomputed old log-probabilities: the first minibatch is exactly on-policy, nothing can clip there.
    for name in ("gspo", "grpo", "grpo_r2"):
        assert arms[name]["clip"]["onpolicy"]["mean"] == 0.0
    # A bf16 sampler disagrees with the fp32 trainer far more than the fp32 sampler does (float noise).
    assert arms["gspo_bf16"]["mismatch"]["token_std"]["mean"] > 100 * arms["gspo"]["mismatch"]["token_std"]["mean"]
    assert arms["gspo_bf16"]["mismatch"]["token_std"]["mean"] > 1e-4
    depths = {row["depth"] for row in results["volatility_depth"]}
    assert depths == {1, 2}
    assert all(0.0 <= row["response"]["mean"] <= 1.0 for row in results["volatility_depth"])


def test_logratio_bins_match_closed_form():
    bins = LogRatioBins()
    old = torch.zeros(3, 4)
    bins.add(old, old, torch.ones(3, 4, dtype=torch.bool))  # on-policy call: all zero, kept apart
    new = torch.tensor([[0.1, -0.1, 0.3, 0.0], [0.2, 0.0, 0.0, 0.0], [0.0, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    bins.add(new, old, mask)
    table = {row["length"]: row for row in bins.table("offpolicy")}
    assert table[3]["responses"] == 1 and table[2]["responses"] == 2
    assert math.isclose(table[2]["token_std"], torch.tensor([0.2, 0.0, 0.0, 0.4]).std(unbiased=False).item(), rel_tol=1e-6)
    assert math.isclose(table[2]["seq_std"], 0.05, rel_tol=1e-6)  # sequence log-ratios 0.1 and 0.2
    merged = LogRatioBins.merged([bins.to_dict(), bins.to_dict()])
    assert merged.table("offpolicy")[0]["responses"] == 2 * bins.table("offpolicy")[0]["responses"]


def test_partial_credit_and_options():
    assert partial_credit("85<eos>", "85") == 1.0
    assert partial_credit("84<eos>", "85") == 0.25  # half the digits, at half weight
    assert parse_options(["quick=true"]).steps == 2
    assert parse_options(["quick=true", "steps=5", "depths=1,8"]).depths == (1, 8)
    with pytest.raises(ConfigError, match="takes seeds"):
        parse_options(["seed=3"])
    with pytest.raises(ConfigError, match="not a valid bool"):
        parse_options(["quick=maybe"])
