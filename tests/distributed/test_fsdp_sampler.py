"""The built-in sampler through the FSDP2 shards (``rollout.sampler_weights=shards``; gloo, CPU, 2 processes).

With the same seeds it samples exactly the tokens and log-probabilities of the whole-copy sampler (float32,
transformers' forward both), training and held-out evaluation included, and the runs end at the same
weights; no whole copy of any weight matrix exists (the engine samples with the sharded policy itself);
processes whose rows finish at different steps keep decoding in lockstep (every FSDP2 forward is a
collective); with ``optim.dtype=bfloat16`` the sampler computes with the bfloat16 gathered layers.
"""

from __future__ import annotations

import gc

import pytest
import torch

from _harness import load_ranks, save_rank, spawn

pytestmark = pytest.mark.distributed

# float32 rounding: the gathered layers and the copy hold the same values, but their matrix products may round
# differently (measured: 2.4e-7 in some rollouts after an update; the first rollouts and the weights were equal)
LOGPROB_ATOL = 1e-6
# the weights after the steps: AdamW divides each gradient by its running RMS, so a gradient's last-bit rounding
# difference moves a weight by more than it moved the log-probabilities (measured 1.04e-6, one element of 2,048,
# on a 2-core Xeon with AMX; within 1e-6 on the AMD EPYC)
PARAM_ATOL = 1e-5
EOS_EVERY = 3  # every third token id ends a response: rows (and each process's batch) finish at different steps


def _whole_matrices(model: torch.nn.Module) -> int:
    """Tensors alive in this process, of any dtype, holding the whole of one of the model's MLP weight matrices
    (FSDP2's own unsharded parameters keep the shape but no storage between forwards: storage counts)."""
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "mlp" in n and p.dim() == 2}
    return sum(1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)
               and tuple(obj.shape) in shapes and obj.untyped_storage().nbytes() >= obj.numel() * obj.element_size())


def _worker(rank: int, world: int, cases: list[list[str]], out: str) -> None:
    from torch.distributed.tensor import DTensor

    from gspo import distributed as dist
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    results = []
    for overrides in cases:
        trainer = Trainer.from_config(load_config(None, overrides), None)
        engine = trainer.parts.engine
        vocab = trainer.model.config.vocab_size
        engine.eos_ids = torch.arange(0, vocab, EOS_EVERY)
        samples, dtypes = [], []
        generate = engine.generate

        def recording(*args, **kwargs):
            rollout = generate(*args, **kwargs)
            samples.append({k: getattr(rollout, k).clone() for k in ("completion_ids", "completion_mask",
                                                                     "logprobs")})
            return rollout

        engine.generate = recording
        layer = trainer.model.model.layers[0].mlp.gate_proj
        layer.register_forward_pre_hook(lambda module, args: dtypes.append(str(module.weight.dtype)))
        for _ in range(trainer.config.steps):
            trainer.train_step()
        sampled_dtypes = sorted(set(dtypes))
        trainer.evaluate()  # held-out, sampled and greedy, through the same engine
        whole_matrices = _whole_matrices(trainer.model)
        results.append({
            "samples": samples, "params": dist.full_model_state(trainer.model), "whole_matrices": whole_matrices,
            "shares_policy": engine.model is trainer.model,
            "engine_sharded": all(isinstance(p, DTensor) for p in engine.model.parameters()),
            "weight_sync": engine.info.weight_sync, "engine": engine.info.name, "dtypes": sampled_dtypes,
            "memory": trainer.parts.memory.describe() if trainer.parts.memory else ""})
    save_rank(results, out, rank)


def _spawn(cases: list[list[str]], out) -> list[list[dict]]:
    """Every case's results, per rank: ``[rank][case]``."""
    spawn(_worker, 2, cases, str(out))
    return load_ranks(out, 2, weights_only=False)


@pytest.fixture
def fsdp_overrides(tiny_overrides) -> list[str]:
    # one minibatch: every process runs the same number of training forwards (docs/distributed.md)
    return [o for o in tiny_overrides if not o.startswith(("optim.minibatches", "eval.size"))] + [
        "distributed.strategy=fsdp", "optim.minibatches=1", "eval.size=4", "rollout.decoder=hf"]


def test_sampling_through_the_shards_equals_the_whole_copy(tmp_path, fsdp_overrides):
    # shards first: the whole-matrix count sees no earlier case's leftovers
    shards_case, copy_case = (fsdp_overrides + [f"rollout.sampler_weights={w}"] for w in ("shards", "copy"))
    ranks = _spawn([shards_case, copy_case], tmp_path / "out")
    for rank, (shards, copy) in enumerate(ranks):
        # steps x rollouts, then the held-out evaluation (sampled and greedy)
        assert len(shards["samples"]) == len(copy["samples"]) == 2 + 2
        for a, b in zip(copy["samples"], shards["samples"]):
            assert torch.equal(a["completion_ids"], b["completion_ids"]), rank
            assert torch.equal(a["completion_mask"], b["completion_mask"]), rank
            torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=0, atol=LOGPROB_ATOL)
        assert copy["weight_sync"] == "copy" and not copy["shares_policy"]
        assert copy["whole_matrices"] > 0  # the copy: whole float32 matrices beside the shards
        assert shards["shares_policy"] and shards["engine_sharded"] and shards["weight_sync"] == "shared"
        assert shards["whole_matrices"] == 0
        assert "sampler through the shards" in shards["memory"]
    for name, tensor in ranks[0][1]["params"].items():
        torch.testing.assert_close(ranks[0][0]["params"][name], tensor, rtol=0, atol=PARAM_ATOL, msg=name)
    # the lockstep was exercised: in some rollout one process's rows ran longer than the other's
    widths = [[s["completion_ids"].shape[1] for s in ranks[r][0]["samples"]] for r in range(2)]
    assert widths[0] != widths[1], widths


def test_sampling_through_bfloat16_shards_computes_in_bfloat16(tmp_path, fsdp_overrides):
    ranks = _spawn([[*fsdp_overrides, "optim.dtype=bfloat16", "rollout.sampler_weights=shards", "steps=1"]],
                   tmp_path / "out")
    for (shards,) in ranks:
        # the gathered layers are bfloat16 in sampling and training alike (MixedPrecisionPolicy's param_dtype)
        assert shards["dtypes"] == ["torch.bfloat16"] and shards["engine"].endswith("bfloat16")
        assert shards["whole_matrices"] == 0
