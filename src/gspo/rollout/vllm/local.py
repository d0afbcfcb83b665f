"""vLLM inside the training process (``rollout.engine=vllm``): colocated sampling, in-memory weight push.

Runs vLLM's engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the policy's tensors go to
``reload_weights`` as an iterator, with no pickling and no file (in vLLM's multiprocess mode they
would have to be pickled, which fails for tensors). Every call into vLLM runs inside
:func:`gspo.rollout.vllm.host.preserved_host_state`, so the trainer's RNGs, threads and NUMA policy
are the same whether or not vLLM ran.
"""

from __future__ import annotations

import os
import time

import torch

from gspo.errors import ConfigError
from gspo.precision import DTYPES
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams, check_request, request_seeds
from gspo.rollout.vllm.convert import Completion, sampling_kwargs, to_rollout
from gspo.rollout.vllm.host import preserved_host_state
from gspo.rollout.vllm.placement import (COLOCATED_GPU_MEMORY, LOGPROBS_MODE, SLEEP_LEVEL,  # noqa: F401
                                         Placement, engine_arguments)
from gspo.rollout.vllm.weights import engine_weights


def vllm_environment(kv_cache_gb: int, *, server: bool) -> dict[str, str]:
    """Environment variables vLLM reads at start.

    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is always set: without it vLLM's CPU backend reserves ~92% of RAM.
    In-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process (tensors are
    then pushed without pickling); a server gets ``VLLM_SERVER_DEV_MODE=1``, which opens its
    ``/collective_rpc`` and ``/reset_prefix_cache`` endpoints.
    """
    if int(kv_cache_gb) != kv_cache_gb or kv_cache_gb < 1:  # vLLM parses it as an int
        raise ConfigError(f"rollout.vllm_kv_cache_gb={kv_cache_gb}: vLLM takes a whole number of GiB >= 1")
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gb))}
    env.update({"VLLM_SERVER_DEV_MODE": "1"} if server else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    return env


class VLLMEngine:
    """vLLM's ``LLM`` in this process, behind gspo's :class:`~gspo.rollout.base.RolloutEngine`.

    ``where``: the device facts its arguments follow (:mod:`gspo.rollout.vllm.placement`). With sleep mode
    (colocated on a GPU) the engine sleeps after every rollout, so the update has the GPU, and wakes before
    the next weight push or rollout.
    """

    def __init__(self, model_path, *, pad_token_id: int, eos_ids: list[int], dtype: str = "float32",
                 max_model_len: int, kv_cache_gb: int = 1, gpu_memory: float = COLOCATED_GPU_MEMORY, seed: int = 0,
                 routed_experts: bool = False, where: Placement = Placement(), max_num_seqs: int = 0) -> None:
        os.environ.update(vllm_environment(kv_cache_gb, server=False))
        self.pad_token_id, self.eos_ids = int(pad_token_id), list(eos_ids)
        self.routed_experts, self.dtype = routed_experts, dtype
        self.last_sync_s: float | None = None  # reported with the next rollout as sync/weights_s
        args = engine_arguments(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                gpu_memory=gpu_memory, routed_experts=routed_experts, where=where,
                                max_num_seqs=max_num_seqs)
        self.sleeps, self.asleep = bool(args.get("enable_sleep_mode")), False
        with preserved_host_state():
            import vllm

            try:
                self.llm = vllm.LLM(**args)
            except Exception as exc:
                if routed_experts:  # vLLM returns routed experts only with its model runner V2 (Triton)
                    raise ConfigError(f"moe.routing_replay=r3 with rollout.engine=vllm needs vLLM's routed "
                                      f"experts, which this vLLM build cannot return ({exc}); "
                                      "use moe.routing_replay=r2, or a GPU build of vLLM") from exc
                raise
        self._vllm = vllm
        self._info = EngineInfo(name=f"vLLM {vllm.__version__} in-process ({dtype})", exact_logprobs=False,
                                behaviour_logprobs=dtype == "float32",  # loss.old_logprobs=auto: sampler's
                                records_routing=routed_experts, weight_sync="reload", reproducible=True)

    @property
    def info(self) -> EngineInfo:
        return self._info

    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                 *, row_seeds: list[int] | None = None, record_routing: bool = False) -> Rollout:
        """One completion per prompt; every request is seeded (``row_seeds``, else drawn from ``generator``)."""
        check_request(prompts, params)
        if record_routing and not self.routed_experts:
            raise ValueError("record_routing=True: this engine was started without routed experts")
        seeds = request_seeds(len(prompts), row_seeds, generator)
        requests = [self._vllm.SamplingParams(**sampling_kwargs(params, self.eos_ids, seed)) for seed in seeds]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        start = time.perf_counter()
        with preserved_host_state():
            self._wake()
            outputs = self.llm.generate(inputs, requests, use_tqdm=False)
            self._sleep()  # the update (or whatever runs next) gets the GPU back
        generate_s = time.perf_counter() - start
        completions = [_completion(out.outputs[0], record_routing) for out in outputs]
        rollout = to_rollout(prompts, completions, params, pad_token_id=self.pad_token_id, eos_ids=self.eos_ids)
        rollout.timings["sample/generate_s"] = generate_s
        if self.last_sync_s is not None:
            rollout.timings["sync/weights_s"], self.last_sync_s = self.last_sync_s, None
        return rollout

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s weights (LoRA merged) into vLLM in place, then drop its prefix cache.

        Without the reset, a prompt whose blocks are cached (prompts of a block, 16 tokens, or more) is
        decoded with keys and values computed under the old weights (a log-prob error of 3.0 measured).
        """
        start = time.perf_counter()
        weights = engine_weights(model, DTYPES[self.dtype])  # streamed, each tensor cast as it is loaded
        with preserved_host_state():
            self._wake()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - start

    def _sleep(self) -> None:
        """Sleep mode: offload the weights and drop the KV cache (GPU memory back to training)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut vLLM's engine down (idempotent)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with preserved_host_state():
                llm.llm_engine.engine_core.shutdown()
            del llm


def _completion(output, record_routing: bool) -> Completion:
    """gspo's :class:`Completion` from a vLLM ``CompletionOutput`` (logprobs: one dict per token)."""
    tokens = list(output.token_ids)
    logprobs = [step[token].logprob for token, step in zip(tokens, output.logprobs)]
    routed = output.routed_experts if record_routing else None
    if record_routing and routed is None:
        raise RuntimeError("vLLM returned no routed_experts although the engine was started with them")
    return Completion(tokens, logprobs, routed)
