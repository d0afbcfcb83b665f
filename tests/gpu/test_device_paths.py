"""GPU tier: the paths issue 22 predicted would fail first on CUDA (G1 sampling with a CPU generator, G2
the device boundary), on the embedded tiny models. Skipped ("no CUDA") without a GPU."""

from __future__ import annotations

import pytest
import torch

from gspo.rollout.base import SamplingParams

pytestmark = pytest.mark.gpu

TINY = ["steps=1", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "optim.minibatches=2", "eval.size=8", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]


def test_sampling_with_a_cpu_generator_on_cuda_logits():
    """G1: a CPU generator (evaluation, benchmarks) seeds rows on the CPU; sampling runs on CUDA."""
    from gspo.models.load import load_model, resolve_model_path
    from gspo.rollout.hf import HFEngine

    model = load_model(resolve_model_path("tiny-arith"), dtype=torch.float32, device="cuda").eval()
    engine = HFEngine(model, pad_token_id=0, eos_token_id=1)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    prompts = [[5, 6, 7, 8]] * 8
    first = engine.generate(prompts, params, torch.Generator().manual_seed(0))
    again = engine.generate(prompts, params, torch.Generator().manual_seed(0))
    assert first.completion_ids.device.type == "cuda"
    assert torch.equal(first.completion_ids, again.completion_ids)


@pytest.mark.parametrize("extra", [[], ["optim.dtype=bfloat16"], ["data.task=calculator", "model=tiny-calc"]])
def test_a_train_step_on_cuda_feeds_the_update_cuda_tensors(extra):
    """G2: evaluation, then one step; every tensor the update receives is on the policy's device."""
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, ["device=cuda", *TINY, *extra]))
    assert 0.0 <= trainer.evaluate()["eval/accuracy"] <= 1.0  # sampled at the training temperature
    seen = []
    original = trainer.updater.update
    trainer.updater.update = lambda policy, opt, sched, inputs, **kw: seen.append(inputs) or original(
        policy, opt, sched, inputs, **kw)
    metrics = trainer.train_step()
    assert seen and seen[0].advantages.device.type == seen[0].input_ids.device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
