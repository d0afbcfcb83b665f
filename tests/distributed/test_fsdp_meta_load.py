"""FSDP2 load: built on the meta device, each process reading only its slices of the checkpoint (gloo, CPU, 2
processes).

After ``Trainer.from_config`` every process's local shards are its slices of the checkpoint, tied weights
are one parameter, the non-persistent rotary buffers equal a normally loaded model's, no process called
``from_pretrained`` and each read only the elements of its own shards, and the KL reference is sharded the
same way. A 2-process run with ``loss.beta > 0``
equals one process, with the sharded reference and with a refreshed (whole) one.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from _harness import load_ranks, save_rank, single, spawn, spawn_run

pytestmark = pytest.mark.distributed


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


def _load_worker(rank: int, world: int, overrides: list[str], out: str) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from transformers import AutoModelForCausalLM

    from gspo import distributed as dist
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    reads, slices = [], []
    from_pretrained = AutoModelForCausalLM.from_pretrained
    AutoModelForCausalLM.from_pretrained = lambda *a, **k: reads.append(1) or from_pretrained(*a, **k)
    read_slice = HuggingFaceStorageReader._process_read_request  # every slice read from the safetensors files

    def counted(self, f, req, planner):
        slices.append(torch.Size(req.lengths).numel())
        return read_slice(self, f, req, planner)

    HuggingFaceStorageReader._process_read_request = counted
    parts = Trainer.from_config(load_config(None, overrides), None).parts
    model, reference = parts.model, parts.reference
    facts = {
        "reads": len(reads),
        "elements_read": sum(slices),
        "local_elements": sum(_local(p).numel() for module in (model, reference) for p in module.parameters()),
        "shards": {n: _local(p) for n, p in model.named_parameters()},
        "reference_shards": {n: _local(p) for n, p in reference.named_parameters()},
        "reference_sharded": dist.is_sharded(reference),
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "ties": bool(model.config.tie_word_embeddings),
        "engine": {n: p.detach().clone() for n, p in parts.engine.model.named_parameters()},
    }
    save_rank(facts, out, rank)


@pytest.fixture
def fsdp_overrides(tiny_overrides) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("rollout.prompts_per_step")] + [
        "rollout.prompts_per_step=4", "distributed.strategy=fsdp", "loss.beta=0.1"]


@pytest.fixture(scope="module")
def tiny_bf16_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved in bfloat16 and split in several files with an index: each process reads its
    slices as stored, the float32 shards widen them."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-bf16")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True,  # the tokenizer; the weights are replaced
                    ignore=shutil.ignore_patterns("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_moe_dir", "tiny_bf16_dir"])
def test_shards_are_the_checkpoints_slices_each_process_reads_its_own(tmp_path, fsdp_overrides, model_dir, request):
    from transformers import AutoModelForCausalLM

    # dense (tied embeddings), MoE (fused expert tensors, per-expert on disk), bf16 files with an index
    path = request.getfixturevalue(model_dir)
    overrides = [o for o in fsdp_overrides if not o.startswith("model=")] + [f"model={path}"]
    spawn(_load_worker, 2, overrides, str(tmp_path / "facts"))
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state, buffers = whole.state_dict(), dict(whole.named_buffers())
    every = load_ranks(tmp_path / "facts", 2)
    assert [facts["reads"] for facts in every] == [0, 0], "no process loads the whole model (from_pretrained)"
    for facts in every:  # policy and KL reference: each process read exactly its shards' elements ...
        assert facts["elements_read"] == facts["local_elements"]
    # ... and together the processes read each element of both models once
    assert sum(facts["elements_read"] for facts in every) == 2 * sum(p.numel() for p in whole.parameters())
    for rank, facts in enumerate(every):
        assert facts["tied"] == facts["ties"]
        assert ("lm_head.weight" in facts["shards"]) != facts["ties"]  # a tied weight is one parameter, listed once
        for name, shard in facts["shards"].items():
            expected = torch.chunk(state[name], 2, dim=0)[rank]  # FSDP2: Shard(0), torch.chunk's cut
            assert torch.equal(shard, expected), name
            assert torch.equal(facts["reference_shards"][name], expected), name
        assert facts["reference_sharded"]
        assert facts["buffers"].keys() == buffers.keys()
        for name, buffer in buffers.items():  # rotary inv_freq: in no state dict, to_empty left it garbage
            assert torch.equal(facts["buffers"][name], buffer), name
        for name, tensor in facts["engine"].items():  # the sampler's whole copy, gathered from the shards
            assert torch.equal(tensor, state[name].to(tensor.dtype)), name


@pytest.mark.parametrize("refresh", [0, 1])
def test_kl_reference_two_processes_match_one(tmp_path, fsdp_overrides, refresh):
    # refresh=0: the sharded reference; 1: loss.ref_refresh_steps keeps it whole, filled from rank 0's read
    overrides = [*fsdp_overrides, f"loss.ref_refresh_steps={refresh}"]
    spawn_run(2, overrides, tmp_path / "fsdp.pt")
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    one_params, one_metrics = single([o for o in overrides if o != "distributed.strategy=fsdp"])
    for name, tensor in one_params.items():
        torch.testing.assert_close(fsdp["params"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for a, b in zip(fsdp["metrics"], one_metrics):  # the KL term is computed against the sharded reference
        assert a["kl/ref"] == pytest.approx(b["kl/ref"], abs=1e-6)
