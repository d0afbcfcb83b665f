"""rollout.engine=vllm-server: a vLLM server gspo starts, feeds weights and stops, with no orphan left."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gspo.rollout.base import RolloutEngine, SamplingParams
from vllm_helpers import LOGPROB_ATOL, LONG, max_logprob_diff, sample_prompts

pytestmark = pytest.mark.vllm


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_gone(pgid: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return group_members(pgid)


@pytest.fixture(scope="module")
def server_engine(long_model_dir, tokenizer):
    from gspo.rollout.vllm.local import engine_arguments
    from gspo.rollout.vllm.server import ServerProcess, VLLMServerEngine

    args = engine_arguments(long_model_dir, dtype="float32", max_model_len=256, seed=0, gpu_memory=0.3,
                            routed_experts=False)
    server = ServerProcess(args, kv_cache_gb=1.0, weight_transfer=False)
    server.wait_ready()
    engine = VLLMServerEngine(server.url, pad_token_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                              server=server, dtype="float32")
    yield engine
    engine.close()


def test_server_row_seeds_match_in_process_engine(server_engine, vllm_engine):
    """The same seeds sample the same tokens through the server as in-process (same weights, fp32)."""
    prompts = sample_prompts(8, 20, 7)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    seeds = list(range(100, 108))
    ours = server_engine.generate(prompts, params, row_seeds=seeds)
    theirs = vllm_engine.generate(prompts, params, row_seeds=seeds)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)


def test_server_logprobs_before_and_after_sync(server_engine, tokenizer, policy):
    from gspo.rollout.vllm.server import VLLMServerEngine

    assert isinstance(server_engine, RolloutEngine)
    assert server_engine.info.weight_sync == "reload" and not server_engine.info.exact_logprobs
    # a float32 server gspo started is pi_old under loss.old_logprobs=auto; the same server reached by its URL
    # (rollout.server_url: dtype unknown) is not
    assert server_engine.info.behaviour_logprobs and "(float32)" in server_engine.info.name
    by_url = VLLMServerEngine(server_engine.url, pad_token_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id])
    assert not by_url.info.behaviour_logprobs and "dtype unknown" in by_url.info.name
    by_url.close()
    params = SamplingParams(max_new_tokens=16, temperature=0.7, ignore_eos=True)
    prompts = sample_prompts(8, LONG, 2)
    before = server_engine.generate(prompts, params, torch.Generator().manual_seed(2))
    diff_before = max_logprob_diff(before, policy, 0.7)
    changed = copy.deepcopy(policy)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    server_engine.sync_weights(changed)
    after = server_engine.generate(prompts, params, torch.Generator().manual_seed(2))
    diff_after, diff_old = max_logprob_diff(after, changed, 0.7), max_logprob_diff(after, policy, 0.7)
    print(f"vllm server logprobs: max |diff| {diff_before:.2e} before, {diff_after:.2e} after a sync "
          f"({after.timings['sync/weights_s']:.3f} s; vs the old weights {diff_old:.2e})")
    assert diff_before < LOGPROB_ATOL and diff_after < LOGPROB_ATOL and diff_old > 100 * LOGPROB_ATOL


def test_close_stops_every_process(server_engine):
    server = server_engine.server
    pgid = server.process.pid
    assert pgid in group_members(pgid)
    server_engine.close()
    server_engine.close()  # idempotent
    assert wait_gone(pgid, timeout=30) == []


OWNER = textwrap.dedent('''
    """Start a vLLM server through gspo, say where it is, then wait to be killed."""
    import json, signal, sys, time
    # Ctrl-C as in a terminal: a runner started in the background (CI, `cmd &`) passes SIGINT down ignored,
    # and Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from gspo.rollout.vllm.local import engine_arguments
    from gspo.rollout.vllm.server import ServerProcess

    args = engine_arguments(sys.argv[1], dtype="float32", max_model_len=256, seed=0, gpu_memory=0.3,
                            routed_experts=False)
    server = ServerProcess(args, kv_cache_gb=1, weight_transfer=False)
    server.wait_ready()
    print(json.dumps({"url": server.url, "pgid": server.process.pid}), flush=True)
    while True:
        time.sleep(1)
''')


def test_server_dies_with_its_owner_and_dead_server_is_a_clear_error(long_model_dir, tokenizer, tmp_path):
    """Ctrl-C (SIGINT) and SIGKILL of the process that started a server: no process of it survives,
    and a client of the dead server gets a ServerError naming the URL."""
    from gspo.rollout.vllm.server import ServerError, VLLMServerEngine

    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owners = {sig: subprocess.Popen([sys.executable, str(script), str(long_model_dir)], stdout=subprocess.PIPE,
                                    text=True) for sig in (signal.SIGINT, signal.SIGKILL)}
    try:
        started = {sig: json.loads(p.stdout.readline()) for sig, p in owners.items()}
        client = VLLMServerEngine(started[signal.SIGKILL]["url"], pad_token_id=tokenizer.pad_token_id,
                                  eos_ids=[tokenizer.eos_token_id])
        rollout = client.generate(sample_prompts(2, 10, 0), SamplingParams(max_new_tokens=4))  # it serves
        assert rollout.completion_ids.shape[0] == 2
        for sig, owner in owners.items():
            owner.send_signal(sig)
        for sig, owner in owners.items():
            owner.wait(timeout=60)
            assert wait_gone(started[sig]["pgid"], timeout=60) == [], f"orphans after {sig.name}"
        with pytest.raises(ServerError, match=started[signal.SIGKILL]["url"].replace(".", r"\.")):
            client.generate(sample_prompts(2, 10, 0), SamplingParams(max_new_tokens=4))
        client.close()
    finally:
        for owner in owners.values():
            if owner.poll() is None:
                owner.kill()
