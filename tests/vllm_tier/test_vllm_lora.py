"""LoRA runs push merged weights: base + (alpha / r) B A under the checkpoint's names, tied LM head included."""

from __future__ import annotations

import pytest
import torch

from gspo.config.schema import LoraConfig
from gspo.rollout.base import SamplingParams

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_policy(long_model_dir):
    """The tiny model with adapters on every linear layer, B made non-zero (a trained adapter)."""
    from gspo.models.load import load_model
    from gspo.models.lora import apply_lora

    model = apply_lora(load_model(long_model_dir, dtype=torch.float32, device="cpu"),
                       LoraConfig(rank=4, alpha=8.0), base_path=long_model_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_engine_weights_are_the_merged_model(lora_policy):
    from gspo.models.lora import merged_copy
    from gspo.rollout.vllm.weights import engine_weights

    ours = dict(engine_weights(lora_policy))
    merged = merged_copy(lora_policy)
    expected = dict(merged.named_parameters(remove_duplicate=False))
    assert ours.keys() == expected.keys()  # HF names, lm_head.weight beside the tied embedding
    for name, tensor in expected.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name
    assert not torch.allclose(ours["model.layers.0.self_attn.q_proj.weight"],
                              lora_policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


@pytest.mark.vllm
def test_vllm_samples_the_lora_policy_after_sync(vllm_engine, lora_policy, policy):
    from gspo.logprobs import token_logprobs

    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 18, (140,), generator=g).tolist() for _ in range(4)]
    try:
        vllm_engine.sync_weights(lora_policy)
        rollout = vllm_engine.generate(prompts, params, torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = token_logprobs(lora_policy, rollout.input_ids, rollout.attention_mask,
                                       rollout.completion_ids.shape[1], temperature=1.0)
        diff = float((rollout.logprobs - reference)[rollout.completion_mask].abs().max())
        print(f"vllm logprobs of the LoRA policy (merged push): max |diff| {diff:.2e}")
        assert diff < 1e-4
    finally:
        vllm_engine.sync_weights(policy)
