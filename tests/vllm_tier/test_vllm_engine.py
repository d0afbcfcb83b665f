"""vLLM in-process engine against the training module and the built-in engine (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from gspo.logprobs import token_logprobs
from gspo.rollout.base import RolloutEngine, SamplingParams
from vllm_helpers import LOGPROB_ATOL, LONG, max_logprob_diff, sample_prompts

pytestmark = pytest.mark.vllm


def test_engine_interface(vllm_engine):
    assert isinstance(vllm_engine, RolloutEngine)
    info = vllm_engine.info
    assert not info.exact_logprobs and info.weight_sync == "reload" and info.reproducible
    assert not info.records_routing


def test_rollout_layout_and_eos(vllm_engine, tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    rollout = vllm_engine.generate(sample_prompts(16, 20, 0), params, torch.Generator().manual_seed(0))
    eos = tokenizer.eos_token_id
    assert rollout.prompt_ids.shape[0] == rollout.completion_ids.shape[0] == 16
    assert rollout.completion_ids.shape[1] <= 12
    assert rollout.logprobs.dtype == torch.float32
    for row in range(16):
        n = int(rollout.completion_mask[row].sum())
        tokens = rollout.completion_ids[row, :n].tolist()
        assert (eos in tokens) == (not bool(rollout.truncated[row]))
        if eos in tokens:
            assert tokens.index(eos) == n - 1  # ends at its first EOS, which is kept
        assert (rollout.completion_ids[row, n:] == tokenizer.pad_token_id).all()
        assert (rollout.logprobs[row, n:] == 0).all() and (rollout.logprobs[row, :n] < 0).all()
    assert (rollout.prompt_ids[rollout.prompt_mask.logical_not()] == tokenizer.pad_token_id).all()
    assert rollout.timings["sample/generate_s"] > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_training_module_long_prompts(vllm_engine, policy, temperature):
    params = SamplingParams(max_new_tokens=24, temperature=temperature, ignore_eos=True)
    rollout = vllm_engine.generate(sample_prompts(8, LONG, 1), params, torch.Generator().manual_seed(1))
    assert rollout.prompt_ids.shape[1] >= 128
    diff = max_logprob_diff(rollout, policy, temperature)
    print(f"vllm logprobs T={temperature}: max |diff| {diff:.2e}")
    assert diff < LOGPROB_ATOL


def test_logprobs_after_weight_sync_long_prompts(vllm_engine, policy):
    """New weights: the next samples' log-probs are the new model's, on prompts the prefix cache holds."""
    import copy

    params = SamplingParams(max_new_tokens=16, temperature=0.7, ignore_eos=True)
    prompts = sample_prompts(8, LONG, 2)
    before = vllm_engine.generate(prompts, params, torch.Generator().manual_seed(2))  # fills the prefix cache
    assert max_logprob_diff(before, policy, 0.7) < LOGPROB_ATOL
    changed = copy.deepcopy(policy)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    try:
        vllm_engine.sync_weights(changed)
        after = vllm_engine.generate(prompts, params, torch.Generator().manual_seed(2))
        assert after.timings["sync/weights_s"] > 0
        diff_new, diff_old = max_logprob_diff(after, changed, 0.7), max_logprob_diff(after, policy, 0.7)
        print(f"vllm logprobs after sync: max |diff| {diff_new:.2e} (vs the old weights {diff_old:.2e})")
        assert diff_new < LOGPROB_ATOL
        assert diff_old > 100 * LOGPROB_ATOL  # the test could tell old weights from new ones
    finally:
        vllm_engine.sync_weights(policy)


def test_greedy_tokens_equal_builtin_engine(vllm_engine, policy, tokenizer):
    from gspo.rollout.hf import HFEngine

    prompts = sample_prompts(12, 30, 4)
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    ours = vllm_engine.generate(prompts, params)
    builtin = HFEngine(policy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    reference = builtin.generate(prompts, params)
    assert torch.equal(ours.completion_ids, reference.completion_ids)
    assert torch.equal(ours.completion_mask, reference.completion_mask)
    assert torch.equal(ours.truncated, reference.truncated)
    # greedy: untempered log-probabilities, like the built-in engine's
    assert torch.allclose(ours.logprobs, reference.logprobs, atol=LOGPROB_ATOL)


def test_row_seeds_independent_of_batch_split(vllm_engine):
    prompts = sample_prompts(12, 20, 5)
    seeds = [1000 + i for i in range(12)]
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    whole = vllm_engine.generate(prompts, params, row_seeds=seeds)
    halves = [vllm_engine.generate(prompts[i:i + 4], params, row_seeds=seeds[i:i + 4]) for i in (8, 0, 4)]
    parts = {8: halves[0], 0: halves[1], 4: halves[2]}
    for start, part in parts.items():
        for row in range(4):
            n = int(part.completion_mask[row].sum())
            assert whole.completion_ids[start + row, :n].tolist() == part.completion_ids[row, :n].tolist()
            assert torch.allclose(whole.logprobs[start + row, :n], part.logprobs[row, :n], atol=1e-5)
    other = vllm_engine.generate(prompts, params, row_seeds=[7 + s for s in seeds])
    assert not torch.equal(other.completion_ids, whole.completion_ids)  # the seed does matter


def test_generator_seeds_reproduce(vllm_engine):
    prompts = sample_prompts(6, 20, 6)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    a = vllm_engine.generate(prompts, params, torch.Generator().manual_seed(9))
    b = vllm_engine.generate(prompts, params, torch.Generator().manual_seed(9))
    assert torch.equal(a.completion_ids, b.completion_ids)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (6, 0.9)])
def test_truncated_logprobs_equal_training_module(vllm_engine, policy, top_k, top_p):
    """vLLM's processed log-probs are over the top-k / top-p support renormalised, as gspo's trainer's."""
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=top_k, top_p=top_p, ignore_eos=True)
    rollout = vllm_engine.generate(sample_prompts(8, 40, 8), params, torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = token_logprobs(policy, rollout.input_ids, rollout.attention_mask,
                                   rollout.completion_ids.shape[1], temperature=0.9, top_k=top_k, top_p=top_p)
    diff = (rollout.logprobs - reference)[rollout.completion_mask].abs()
    print(f"vllm truncated logprobs top_k={top_k} top_p={top_p}: max |diff| {diff.max():.2e}, "
          f"{int((diff > LOGPROB_ATOL).sum())} of {diff.numel()} tokens beyond {LOGPROB_ATOL}")
    assert torch.isfinite(reference[rollout.completion_mask]).all()  # every sampled token inside gspo's support
    assert float(diff.max()) < LOGPROB_ATOL


BF16_LOGPROB_ATOL = 0.3  # a bfloat16 engine against the float32 module on bf16-rounded weights (measured 0.105)


def test_bfloat16_engine_samples_the_pushed_weights(long_model_dir):
    """G19.2: a bfloat16 engine (the GPU default) is pushed bfloat16 tensors, cast one at a time as they are
    sent; its log-probabilities afterwards are the new weights' (to bfloat16 rounding), not the old ones'.

    In its own process: a second in-process vLLM engine's shutdown tears down vLLM's process groups, which
    the session's engine shares (the tests after it then fail with "pipeline model parallel group is not
    initialized")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _BF16_PUSH, str(long_model_dir), str(BF16_LOGPROB_ATOL)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)
    print(done.stdout[-2000:])
    assert done.returncode == 0, done.stdout[-4000:]
    assert "Attempted to load weight" not in done.stdout.split("PUSHED", 1)[1]  # pushed as bfloat16 already


_BF16_PUSH = """
import copy, sys
import torch
from gspo.models.load import load_model, load_tokenizer
from gspo.rollout.base import SamplingParams
from gspo.rollout.vllm.local import VLLMEngine
from vllm_helpers import LONG, max_logprob_diff, sample_prompts

path, atol = sys.argv[1], float(sys.argv[2])
tokenizer = load_tokenizer(path)
policy = load_model(path, dtype=torch.float32, device="cpu").eval()
engine = VLLMEngine(path, pad_token_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                    dtype="bfloat16", max_model_len=256, kv_cache_gb=1)
changed = copy.deepcopy(policy)
with torch.no_grad():
    g = torch.Generator().manual_seed(4)
    for p in changed.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
sys.stdout.flush(); sys.stderr.flush()
print("PUSHED", flush=True)  # the start's load from the float32 checkpoint warns once per tensor: before this
engine.sync_weights(changed)  # float32 policy -> bfloat16 engine
sys.stdout.flush(); sys.stderr.flush()
rounded = copy.deepcopy(changed).to(torch.bfloat16).float()
params = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
rollout = engine.generate(sample_prompts(8, LONG, 5), params, torch.Generator().manual_seed(5))
diff_new, diff_old = max_logprob_diff(rollout, rounded, 1.0), max_logprob_diff(rollout, policy, 1.0)
print(f"bfloat16 vLLM after a push: max |diff| {diff_new:.3f} (vs the old weights {diff_old:.3f})")
assert diff_new < atol and diff_old > 3 * diff_new, (diff_new, diff_old)
engine.close()
"""
