"""Fused and per-expert names of MoE weights: transformers 5 in memory, checkpoints and vLLM on the other side.

Used where weights cross that line: the weight push to vLLM (``gspo.rollout.vllm.weights``) and the FSDP2
sharded load, which reads a process's experts from a checkpoint's per-expert tensors (``gspo.trainer.fsdp_load``).
"""

from __future__ import annotations

import torch


def unfused_experts(weights: list[tuple[str, torch.Tensor]], first: int = 0) -> list[tuple[str, torch.Tensor]]:
    """transformers-5 fused MoE expert tensors as the per-expert tensors of checkpoints (and vLLM's loaders).

    transformers 5 holds a Qwen3-MoE layer's experts as ``mlp.experts.gate_up_proj`` (E, 2I, H), gate
    rows then up rows, and ``mlp.experts.down_proj`` (E, H, I); the checkpoints on disk, and the names
    every vLLM MoE loader maps (``experts.{e}.gate_proj.weight`` ...), are per expert. Pushing the
    fused names breaks or silently skips the experts depending on the vLLM version (verl PR #6896,
    SGLang #29659). The per-expert tensors are views (no copy); other tensors pass through.
    Cost: 3 E tensors per MoE layer per sync (about 18k for Qwen3-30B-A3B). ``first``: the number of the
    first expert the tensors hold (an FSDP2 shard's experts, read from a checkpoint by ``fsdp_load``).
    """
    out = []
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".experts.")
        if not prefix or leaf not in ("gate_up_proj", "down_proj") or tensor.dim() != 3:
            out.append((name, tensor))
        elif leaf == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)  # (E, I, H) each
            for e in range(tensor.shape[0]):
                out += [(f"{prefix}.experts.{first + e}.gate_proj.weight", gate[e]),
                        (f"{prefix}.experts.{first + e}.up_proj.weight", up[e])]
        else:
            out += [(f"{prefix}.experts.{first + e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
    return out
