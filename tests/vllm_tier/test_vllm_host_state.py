"""In-process vLLM leaves the host process as gspo set it up (RNGs, threads, NUMA policy, environment)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ASSET = Path(__file__).resolve().parents[2] / "src" / "gspo" / "assets" / "tiny-arith"

SCRIPT = textwrap.dedent('''
    import json, random, sys
    import numpy as np, torch
    torch.set_num_threads(1); torch.manual_seed(123); random.seed(4); np.random.seed(5)
    from gspo.models.load import load_model
    from gspo.rollout.base import SamplingParams
    from gspo.rollout.vllm.host import host_state
    from gspo.rollout.vllm.local import VLLMEngine

    before = host_state()
    engine = VLLMEngine(sys.argv[1], pad_token_id=0, eos_ids=[1], max_model_len=64)
    engine.generate([[3, 4, 5]] * 4, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    engine.sync_weights(load_model(sys.argv[1], dtype=torch.float32, device="cpu"))
    after = host_state()
    torch.set_num_threads(2)
    threads_set = torch.get_num_threads()
    # control: the same call without gspo's guard moves the host's RNG (so the comparison above can fail)
    rng = torch.get_rng_state()
    engine.llm.generate([{"prompt_token_ids": [3, 4, 5]}], engine._vllm.SamplingParams(max_tokens=4, seed=1),
                        use_tqdm=False)
    unguarded_moves_rng = not torch.equal(rng, torch.get_rng_state())
    changed = sorted(k for k in before if before[k] != after[k])
    print("RESULT " + json.dumps({"changed": changed, "threads_set": threads_set,
                                  "unguarded_moves_rng": unguarded_moves_rng, "mempolicy": after["mempolicy"]}))
    engine.close()
''')


def test_host_state_survives_engine_start_generate_and_sync():
    """A fresh process: vLLM starts, samples and reloads weights; nothing of the host's state moved."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ASSET)], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["changed"] == []  # torch / python / numpy RNG, threads, set_num_threads, affinity, NUMA, env
    assert result["threads_set"] == 2  # torch.set_num_threads works again (vLLM had replaced it)
    assert result["unguarded_moves_rng"]  # the guard is what keeps the RNG still
