"""FSDP2 memory: each process holds its shard of the weights and nothing whole beside the sampler (gloo, CPU).

Two processes: the local parameter storage is about half the model; no float32 whole weight matrix is
alive anywhere (the sampler's own copy is bfloat16 here); gradients are reduced every micro-batch and
the run still equals one process; with ``optim.dtype=bfloat16`` the layers compute with bfloat16
gathered weights while the shards and the optimizer state stay float32 (the master copy).
"""

from __future__ import annotations

import gc

import pytest
import torch

from _harness import load_ranks, save_rank, spawn

pytestmark = pytest.mark.distributed

ONE_PROCESS_ATOL = 1e-5  # float32 sums over processes in another order (as in test_data_parallel.py)


def _whole_float32_copies(model: torch.nn.Module) -> int:
    """Plain float32 tensors alive in this process holding the whole of one of the model's MLP weight matrices.

    FSDP2's own unsharded parameters have the whole shape but no storage between forwards: storage counts.
    """
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "mlp" in n and p.dim() == 2}
    return sum(1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)
               and obj.dtype == torch.float32 and tuple(obj.shape) in shapes
               and obj.untyped_storage().nbytes() >= obj.numel() * obj.element_size())


def _worker(rank: int, world: int, overrides: list[str], out: str) -> None:
    from torch.distributed.tensor import DTensor

    from gspo import distributed as dist
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, overrides), None)
    compute_dtypes = []
    layer = trainer.model.model.layers[0].mlp.gate_proj
    layer.register_forward_pre_hook(lambda module, args: compute_dtypes.append(str(module.weight.dtype)))
    for _ in range(trainer.config.steps):
        trainer.train_step()
    params = list(trainer.model.parameters())
    optimizer_dtypes = {str(v.dtype) for s in trainer.parts.optimizer.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and v.dim()}
    facts = {"local": sum(p.to_local().numel() for p in params), "total": sum(p.numel() for p in params),
             "all_sharded": all(isinstance(p, DTensor) for p in params),
             "shard_dtypes": sorted({str(p.dtype) for p in params}), "optimizer_dtypes": sorted(optimizer_dtypes),
             "compute_dtypes": sorted(set(compute_dtypes)), "whole_copies": _whole_float32_copies(trainer.model)}
    save_rank(facts, out, rank)
    whole = dist.full_model_state(trainer.model)  # a collective: every process takes part
    if rank == 0:
        torch.save(whole, f"{out}.pt")


def _spawn(overrides: list[str], out) -> list[dict]:
    spawn(_worker, 2, overrides, str(out))
    return load_ranks(out, 2)


@pytest.fixture
def overrides(tiny_overrides) -> list[str]:
    return [*tiny_overrides, "distributed.strategy=fsdp", "rollout.engine_dtype=bfloat16"]


def test_fsdp2_keeps_half_the_weights_per_process_and_matches_one_process(tmp_path, overrides):
    # four micro-batches per process; one minibatch, so both processes hold 8 rows (every FSDP2 forward is a
    # collective: with minibatches drawn from a global permutation the per-process counts could differ)
    overrides = [*[o for o in overrides if not o.startswith("optim.minibatches")], "optim.minibatches=1",
                 "optim.micro_batch_size=2"]
    facts = _spawn(overrides, tmp_path / "fsdp")
    for rank in facts:
        assert rank["all_sharded"]
        assert 0.4 < rank["local"] / rank["total"] < 0.6  # ~1/2 (uneven shards of small tensors round)
        assert rank["whole_copies"] == 0  # no float32 whole copy (the sampler's copy is bfloat16)
    assert facts[0]["local"] + facts[1]["local"] >= facts[0]["total"]

    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, overrides), None)
    for _ in range(trainer.config.steps):
        trainer.train_step()
    two = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    for name, tensor in trainer.model.named_parameters():
        torch.testing.assert_close(two[name], tensor.detach(), rtol=0, atol=ONE_PROCESS_ATOL, msg=name)


def test_fsdp2_computes_in_bfloat16_over_float32_master_shards(tmp_path, overrides):
    facts = _spawn([*overrides, "optim.dtype=bfloat16", "steps=1"], tmp_path / "bf16")
    for rank in facts:
        assert rank["compute_dtypes"] == ["torch.bfloat16"]  # the gathered weights a layer computes with
        assert rank["shard_dtypes"] == ["torch.float32"] and rank["optimizer_dtypes"] == ["torch.float32"]
