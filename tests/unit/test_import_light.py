"""`import gspo` must stay light: no transformers, and no torch.distributed module beyond what a bare
`import torch` already loads (torch 2.x imports `torch.distributed` itself on many builds, so the
meaningful check is "nothing new"). Run in fresh interpreters so other tests' imports do not leak in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

PROBE = """
import json, sys
import torch
before = set(sys.modules)
{statement}
new = sorted(set(sys.modules) - before)
heavy = [m for m in new if m.split(".")[0] == "transformers" or m.startswith("torch.distributed")]
print(json.dumps({{"heavy": heavy, "transformers_loaded": "transformers" in sys.modules,
                  "bare_torch_has_distributed": any(m.startswith("torch.distributed") for m in before),
                  "new": new}}))
"""


def probe(statement: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", PROBE.format(statement=statement)],
                            capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_gspo_and_its_functions_loads_no_heavy_module():
    report = probe("import gspo\nfrom gspo import gspo_loss, gspo_token_loss, grpo_loss, dapo_loss, "
                   "group_advantages\nimport gspo.algorithms")
    assert report["heavy"] == []
    assert report["transformers_loaded"] is False
    assert "gspo.algorithms.gspo" in report["new"]  # the probe did import the package
    assert not any(m.startswith("gspo.") and not m.startswith("gspo.algorithms") for m in report["new"])


def test_probe_detects_a_heavy_import():
    """Control: the same probe flags a torch.distributed submodule that bare torch does not load,
    so the test above can fail."""
    report = probe("import gspo\nimport torch.distributed.fsdp")
    assert any(m.startswith("torch.distributed.fsdp") for m in report["heavy"])
