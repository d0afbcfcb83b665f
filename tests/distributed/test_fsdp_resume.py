"""FSDP2 resume: a run checkpointed and resumed ends where the uninterrupted run ends (gloo, CPU).

With the same process count the resumed run is bitwise equal; across process counts (1 -> 2, 2 -> 1)
gradients are summed over processes in another order, so the result is equal to float32 rounding,
amplified by Adam over the remaining steps: 1e-5 absolute (the tolerance of the 2-versus-1-process
tests in test_data_parallel.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _harness import spawn

pytestmark = pytest.mark.distributed

CROSS_COUNT_ATOL = 1e-5  # float32 sums over processes in another order (see module docstring)


def _worker(rank: int, world: int, overrides: list[str], resume: bool, sharded_min_params: int | None) -> None:
    from gspo.config import load_config
    from gspo.trainer.run import train

    if sharded_min_params is not None:  # the test-only override: sharded (DCP) checkpoints for a tiny model
        import gspo.checkpoint.sharded

        gspo.checkpoint.sharded.SHARDED_MIN_PARAMS = sharded_min_params
    config = load_config(None, overrides)
    train(config, config.run_dir, resume=resume)


def train_run(world: int, overrides: list[str], *, resume: bool = False, sharded_min_params: int | None = None
              ) -> None:
    """``gspo train`` with ``world`` processes (1: in this process, no process group)."""
    if world == 1:
        from gspo.config import load_config
        from gspo.trainer.run import train

        config = load_config(None, overrides)
        train(config, config.run_dir, resume=resume)
        return
    spawn(_worker, world, overrides, resume, sharded_min_params)


def final_state(run: Path, step: int) -> tuple[dict, dict]:
    """(weights, optimizer state tensors by flattened key) of ``run``'s checkpoint at ``step`` (whole or sharded)."""
    from gspo.checkpoint.load import read_full_checkpoint

    path = run / "checkpoints" / f"step-{step:08d}"
    if (path / "dcp").is_dir():
        return _read_sharded(path)
    weights, optimizer = read_full_checkpoint(path)
    flat = {}
    for name, entry in optimizer["state"].items():
        for key, value in entry.items():
            flat[f"{name}.{key}"] = value
    return weights, flat


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, reward_module) -> list[str]:
    return [f"model={tiny_model_dir}", f"reward.functions={reward_module}:ones", "rollout.prompts_per_step=4",
            "rollout.group_size=4", "rollout.max_new_tokens=6", "optim.minibatches=2", "optim.lr=1e-3",
            "eval.size=8", "log.progress=false", "log.tensorboard=false", "checkpoint.every=1",
            "distributed.strategy=fsdp", "optim.adam_eps=1e-4"]  # eps: see optim.adam_eps's help


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, overrides) -> Path:
    """Three steps with two FSDP2 processes, never stopped."""
    run = tmp_path_factory.mktemp("fsdp") / "whole"
    train_run(2, [*overrides, "steps=3", f"run_dir={run}"])
    return run


def _assert_same(run: Path, reference: Path, atol: float) -> None:
    for got, want in zip(final_state(run, 3), final_state(reference, 3)):
        # a DCP state dict names a tied weight twice; a whole checkpoint once, as save_pretrained does
        assert want.keys() <= got.keys() and set(got) - set(want) <= {"lm_head.weight"}
        for name, tensor in want.items():
            if atol == 0:
                assert torch.equal(got[name], tensor), name
            else:
                torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=name)


def test_fsdp2_resume_with_two_processes_is_bitwise(tmp_path, overrides, uninterrupted):
    run = tmp_path / "run"
    train_run(2, [*overrides, "steps=2", f"run_dir={run}"])
    train_run(2, [*overrides, "steps=3", f"run_dir={run}"], resume=True)  # loads into DTensor parameters
    _assert_same(run, uninterrupted, atol=0)


def test_fsdp2_resume_from_one_process_into_two(tmp_path, overrides, uninterrupted):
    run = tmp_path / "run"
    train_run(1, [*overrides, "steps=2", f"run_dir={run}"])
    train_run(2, [*overrides, "steps=3", f"run_dir={run}"], resume=True)
    _assert_same(run, uninterrupted, atol=CROSS_COUNT_ATOL)


def test_fsdp2_resume_from_two_processes_into_one(tmp_path, overrides, uninterrupted):
    run = tmp_path / "run"
    train_run(2, [*overrides, "steps=2", f"run_dir={run}"])
    train_run(1, [*overrides, "steps=3", f"run_dir={run}"], resume=True)
    _assert_same(run, uninterrupted, atol=CROSS_COUNT_ATOL)


def _read_sharded(path: Path) -> tuple[dict, dict]:
    """(weights, flattened optimizer state) of a sharded checkpoint, read in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path / "dcp"), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    weights = dict(state["model"])
    flat = {f"{name}.{key}": value for name, entry in state["optimizer"]["state"].items()
            for key, value in entry.items()}
    return weights, flat


def test_sharded_checkpoints_above_the_threshold_resume_and_export(tmp_path, overrides, uninterrupted):
    from safetensors.torch import load_file

    from gspo.export import export_model

    run = tmp_path / "run"
    train_run(2, [*overrides, "steps=2", f"run_dir={run}"], sharded_min_params=0)
    step2 = run / "checkpoints" / "step-00000002"
    assert (step2 / "dcp" / ".metadata").is_file() and not (step2 / "model.safetensors").exists()
    assert "dcp/.metadata" in (step2 / "manifest.json").read_text()  # checksummed like every other file
    train_run(2, [*overrides, "steps=3", f"run_dir={run}"], resume=True, sharded_min_params=0)
    _assert_same(run, uninterrupted, atol=0)  # weights and optimizer state, bitwise

    out = export_model(run, tmp_path / "hf")  # DCP -> a Hugging Face directory
    exported, (whole, _) = load_file(out / "model.safetensors"), final_state(uninterrupted, 3)
    for name, tensor in exported.items():
        assert torch.equal(tensor, whole[name]), name


def test_sharded_checkpoint_resumes_in_one_process(tmp_path, overrides, uninterrupted):
    run = tmp_path / "run"
    train_run(2, [*overrides, "steps=2", f"run_dir={run}"], sharded_min_params=0)
    train_run(1, [*overrides, "steps=3", f"run_dir={run}"], resume=True)  # DCP reshards into one process
    _assert_same(run, uninterrupted, atol=CROSS_COUNT_ATOL)


def test_fsdp2_lora_resume_with_two_processes_is_bitwise(tmp_path, overrides):
    from safetensors.torch import load_file

    lora = [*overrides, "lora.rank=4"]
    train_run(2, [*lora, "steps=2", f"run_dir={tmp_path / 'whole'}"])
    train_run(2, [*lora, "steps=1", f"run_dir={tmp_path / 'run'}"])
    train_run(2, [*lora, "steps=2", f"run_dir={tmp_path / 'run'}"], resume=True)  # the adapter into shards
    got, want = (load_file(tmp_path / run / "checkpoints" / "step-00000002" / "adapter_model.safetensors")
                 for run in ("run", "whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
