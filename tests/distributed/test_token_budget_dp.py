"""Token-budget micro-batches under data parallelism: the same forwards on every process.

Each process packs its own responses by length, so their greedy micro-batch counts differ; FSDP2 gathers
shards in every forward, so each process must run the largest count (trainer/micro.py). Two FSDP2
processes with a token budget and recomputed pi_old must train like one process without either.
"""

from __future__ import annotations

import pytest
import torch

from _harness import single, spawn_run  # tests/distributed is on sys.path under pytest

pytestmark = pytest.mark.distributed


def test_fsdp2_token_budget_matches_one_process(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("rollout.prompts_per_step")] + ["rollout.prompts_per_step=4"]
    budget = [*base, "optim.micro_batch_tokens=20", "loss.old_logprobs=recompute", "distributed.strategy=fsdp"]
    spawn_run(2, budget, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one_params, _ = single(base)
    for name, tensor in one_params.items():
        torch.testing.assert_close(two["params"][name], tensor, rtol=0, atol=1e-5, msg=name)
