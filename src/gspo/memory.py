"""Peak memory of a run, estimated before the model loads (say before it fails).

:func:`estimate` turns a model's ``config.json`` (:class:`ModelShape`: layers, hidden, intermediate,
heads, KV heads, vocabulary, tied embeddings, MoE experts) and the run's config (rows per micro-batch or
token budget, prompt + response length, precision, AdamW, LoRA, activation checkpointing, the sampler's
KV cache, processes and DDP / FSDP2) into a per-process peak in bytes, itemised; :func:`sampler_estimate`
does the same for the pipelined mode's sampler process (``rollout.max_staleness >= 1``). :mod:`gspo.memory_plan`
compares them with what the machine has, decides the ``auto`` settings and refuses a run that cannot fit.

The model of a step: persistent state (float32 master weights, gradients and AdamW's two moments, sharded
by N under FSDP2: the trainer frees the gradients after each optimizer step, so counting them through
sampling overestimates runs whose sampling transient is the largest; DDP's gradient buckets; a
lower-precision sampler copy, whole under FSDP2 unless the sampler samples through the shards (vLLM
instead: its weights and KV cache space where it runs in this process on the CPU); a KL reference copy,
sharded like the policy under FSDP2 unless refreshed) plus the largest of three transients: sampling (KV
cache and logits of every local response; through the shards, the gathered layers too), a training
micro-batch (saved activations per token and layer, the compute-dtype weight casts alive at once,
the chunked LM head's logits; under FSDP2 the gathered compute-dtype layers instead of
the casts) and a no-grad pi_old / reference pass. The per-token activation coefficients count the tensors a
Qwen3/Llama layer saves for its backward (checked against ``saved_tensors_hooks``: within 6% in float32
and bfloat16). Checked against peak RSS measured on the CPU (docs/memory.md; tests/unit/test_memory.py
pins every case of benchmarks/results/memory_cpu.json, float32 and bfloat16, and the issue's two 0.6B
figures within 20%). Not measured on a GPU: CUDA adds its context and allocator caching, covered
only by :data:`CUDA_RUNTIME_BYTES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GB = 1024**3
# Python + torch + transformers + gspo resident before any model (measured on the CPU: ~0.45 GB peak RSS
# of a process that built the tiny model and ran one step).
CPU_RUNTIME_BYTES = int(0.45 * GB)
# The CUDA context and the caching allocator's slack on a GPU (an allowance, not a measurement).
CUDA_RUNTIME_BYTES = int(1.0 * GB)
# Prompt length assumed when the run's prompts are not known yet (before the tokenizer and data meet).
ASSUMED_PROMPT_TOKENS = 128
# The chunked LM head (gspo.logprobs.DEFAULT_CHUNK_TOKENS): one (chunk, V) float32 logits buffer over the
# completion positions, recomputed and worked on in place in the backward.
LM_HEAD_CHUNK_TOKENS = 512
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A weight push to the sampler process (gspo.rollout.subprocess) travels in parts of about this size: a part
# closes once it reaches it, so it holds up to this plus one tensor.
PUSH_BYTES = 256 * 1024 * 1024
# gspo.rollout.native.SUPPORTED_MODEL_TYPES (this module imports no torch; a test keeps the two equal)
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ADAMW_STATE_PER_PARAM = 2  # exp_avg and exp_avg_sq, float32 like the master weights


@dataclass(frozen=True)
class ModelShape:
    """The shape facts of a Hugging Face causal LM config that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    experts: int = 0  # MoE: routed experts per layer (0 = dense)
    expert_intermediate: int = 0
    experts_per_token: int = 0
    native: bool = False  # a model gspo's native decoder samples (gspo.rollout.native.native_support, from the config)

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a ``config.json`` dict (a multimodal config's ``text_config`` is used when present)."""
        c = config.get("text_config") or config
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        experts = int(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0)
        return cls(
            layers=int(c["num_hidden_layers"]), hidden=hidden, intermediate=int(c.get("intermediate_size") or 0),
            heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
            experts=experts, expert_intermediate=int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 0),
            experts_per_token=int(c.get("num_experts_per_tok") or 0),
            native=(c.get("model_type") or config.get("model_type")) in NATIVE_MODEL_TYPES and not experts
            and c.get("hidden_act", "silu") == "silu" and not c.get("use_sliding_window")
            and not (c.get("model_type") == "mistral" and c.get("sliding_window") is not None))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelShape":
        return cls.from_config(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")))

    @property
    def attention_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 2 * self.head_dim  # q, k, v, o; Qwen3's q/k norms

    @property
    def mlp_params(self) -> int:
        if self.experts:
            return self.experts * 3 * self.hidden * self.expert_intermediate + self.hidden * self.experts
        return 3 * self.hidden * self.intermediate  # gate, up, down

    @property
    def params(self) -> int:
        """All parameters: embeddings (twice when untied), every layer, the norms."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * (self.attention_params + self.mlp_params + 2 * self.hidden) + self.hidden

    @property
    def decode_params(self) -> int:
        """Weights the native decoder prepacks for a rollout on a CPU in bfloat16 (gspo.rollout.native): every
        layer's projections and the LM head; none for MoE models (sampled through transformers' forward)."""
        if self.experts:
            return 0
        norms = 2 * self.head_dim
        return self.layers * (self.attention_params - norms + self.mlp_params) + self.vocab * self.hidden

    def linear_params(self, targets: int = 7) -> int:
        """LoRA: parameters of a rank-1 adapter on every linear layer but the head (in + out per adapted matrix)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = (self.hidden + q) + 2 * (self.hidden + kv) + (q + self.hidden)
        inter = self.expert_intermediate * (self.experts_per_token or 1) if self.experts else self.intermediate
        return self.layers * (attn + 3 * (self.hidden + inter))

    def activation_bytes_per_token(self, compute: str, checkpointing: bool) -> float:
        """Bytes a training forward keeps per token for its backward, summed over layers.

        Per layer (Qwen3 / Llama, autocast): the float32 residual stream around the two RMSNorms (input,
        normalised output, and the squared input: ~8 hidden), the compute-dtype copies the linears save (their
        inputs: 2 hidden-wide and 1 intermediate-wide), q / k / v before and after the q/k norms and rotary
        embedding (float32 norms), the attention output and its log-sum-exp, and the MLP's gate, up, their
        SiLU and product (4 intermediate-wide). With checkpointing, only each layer's input is kept (plus one
        layer's worth during its recomputation).
        """
        b = BYTES[compute]
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        inter = self.expert_intermediate * self.experts_per_token if self.experts else self.intermediate
        per_layer = 4 * 8 * self.hidden + b * (2 * self.hidden + q) + (4 + b) * (q + 2 * kv) + b * (q + 5 * inter)
        if checkpointing:
            return 4 * self.hidden * self.layers + per_layer
        return per_layer * self.layers


@dataclass(frozen=True)
class RunShape:
    """The run facts memory depends on, per process."""

    responses: int  # responses sampled per step by this process
    minibatch_rows: int  # responses per optimizer step on this process
    micro_rows: int  # responses per forward/backward (0 = the whole minibatch)
    micro_tokens: int  # token budget per forward/backward (0 = by rows)
    prompt_tokens: int
    response_tokens: int
    compute: str = "float32"
    sampler: str = "float32"
    lora_rank: int = 0
    checkpointing: bool = False
    reference: bool = False  # a frozen KL reference copy (loss.beta > 0 without LoRA)
    reference_whole: bool = False  # refreshed (loss.ref_refresh_steps > 0): whole on every process under FSDP2
    processes: int = 1
    strategy: str = "ddp"
    device: str = "cpu"
    sampler_weights: str = "copy"  # FSDP2, built-in sampler: copy (a whole copy) or shards (through the shards)
    sampler_can_shard: bool = False  # whether shards is possible (gspo.memory_plan.sampler_shards_refusal)
    engine: str = "hf"  # rollout.engine: hf (the built-in engine) or vllm / vllm-server (their own memory)
    engine_cache_bytes: int = 0  # vLLM on the CPU: the KV cache space it is given (rollout.vllm_kv_cache_gb)
    sampler_process: bool = False  # rollout.max_staleness >= 1: the sampler runs in a process of its own

    @classmethod
    def from_config(cls, config, precision, *, prompt_tokens: int = ASSUMED_PROMPT_TOKENS, processes: int = 1,
                    device: str = "cpu") -> "RunShape":
        """The run as configured, ``auto`` settings as off and 0 (gspo.memory_plan decides them)."""
        r, o = config.rollout, config.optim
        responses = -(-r.prompts_per_step * r.group_size // processes)
        sampler = precision.sampler
        if r.engine != "hf" and r.engine_dtype == "auto":  # vLLM's auto (gspo.rollout.vllm.placement.engine_dtype)
            sampler = "bfloat16" if device == "cuda" else "float32"
        return cls(responses=responses, minibatch_rows=-(-responses // o.minibatches), micro_rows=o.micro_batch_size,
                   micro_tokens=max(o.micro_batch_tokens, 0), prompt_tokens=prompt_tokens,
                   response_tokens=r.max_new_tokens, compute=precision.compute, sampler=sampler,
                   lora_rank=config.lora.rank, checkpointing=o.gradient_checkpointing == "true",
                   reference=config.loss.beta > 0 and not config.lora.rank,
                   reference_whole=config.loss.ref_refresh_steps > 0,
                   processes=processes, strategy=config.distributed.strategy, device=device,
                   sampler_weights="shards" if r.sampler_weights == "shards" else "copy", engine=r.engine,
                   engine_cache_bytes=r.vllm_kv_cache_gb * GB if r.engine != "hf" and device != "cuda" else 0,
                   sampler_process=r.max_staleness > 0)

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def micro_batch_tokens(self) -> int:
        """Padded tokens in the largest training forward (at least one whole response)."""
        rows = self.micro_rows or self.minibatch_rows
        if self.micro_tokens:
            rows = min(rows, max(1, self.micro_tokens // self.sequence_tokens))
        return rows * self.sequence_tokens


@dataclass(frozen=True)
class Estimate:
    """A per-process peak in bytes, itemised (``parts``: name -> bytes); ``total`` is their sum."""

    parts: dict

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def transient(self) -> int:
        """The largest transient's bytes: :func:`estimate` and :func:`sampler_estimate` add it last."""
        return list(self.parts.values())[-1]

    def describe(self) -> str:
        items = ", ".join(f"{name} {value / GB:.1f}" for name, value in self.parts.items() if value >= 0.05 * GB)
        return f"{self.total / GB:.1f} GB ({items})"


def estimate(model: ModelShape, run: RunShape) -> Estimate:
    """The peak bytes of one process of ``run`` on ``model`` (see the module docstring for the model)."""
    params = model.params
    sharded = run.strategy == "fsdp" and run.processes > 1
    shard = run.processes if sharded else 1
    trainable = model.linear_params() * run.lora_rank if run.lora_rank else params
    parts = {"runtime": CUDA_RUNTIME_BYTES if run.device == "cuda" else CPU_RUNTIME_BYTES,
             "weights": 4 * params // shard, "gradients": 4 * trainable // shard,
             "optimizer": 4 * ADAMW_STATE_PER_PARAM * trainable // shard}
    if run.processes > 1 and not sharded:  # DDP: its gradient buckets are a second copy of the gradients
        parts["DDP buckets"] = 4 * trainable
    through_shards = sharded and run.sampler_weights == "shards"  # rollout.sampler_weights: no whole copy
    built_in = run.engine == "hf"  # vLLM holds its weights and KV cache itself (below)
    # FSDP2: a whole copy (trainer/build.py); pipelined, the in-process engine stays for evaluation. None where the
    # native decoder packs the training weights at every rollout (gspo.rollout.hf: a CPU, bfloat16, not sharded)
    packs_from_policy = _prepacked(run) and model.native and not sharded and not run.lora_rank
    if built_in and (run.sampler != "float32" or sharded) and not through_shards and not packs_from_policy:
        parts["sampler copy"] = BYTES[run.sampler] * params
    if run.engine == "vllm" and run.device != "cuda" and not run.sampler_process:  # in this process, on the CPU
        parts["vLLM engine"] = BYTES[run.sampler] * params + run.engine_cache_bytes
    if run.reference:  # sharded like the policy under FSDP2 (trainer/fsdp_load.py) unless refreshed
        parts["reference"] = 4 * params // (1 if run.reference_whole else shard)
    gathered = _gathered_bytes(model, run) if sharded else 0
    sampling = _sampling_name(run) + (" + gathered layers" if through_shards else "")
    transients = {"activations": _training_bytes(model, run, params) + gathered,
                  "no-grad pass": _no_grad_bytes(model, run, params) + gathered}
    if built_in:
        transients[sampling] = _sampling_bytes(model, run) + (_gathered_bytes(model, run, grads=False)
                                                              if through_shards else 0)
    if run.sampler_process:  # the parts of a push wait in the queue's buffer while the sampler is busy
        transients["weight push"] = _push_bytes(model, run) + min(_push_bytes(model, run), _part_bytes(model, run))
    name = max(transients, key=transients.get)
    parts[name] = transients[name]
    return Estimate(parts)


def sampler_estimate(model: ModelShape, run: RunShape) -> Estimate | None:
    """The peak bytes of the pipelined mode's sampler process (``rollout.max_staleness >= 1``, the built-in
    engine; None otherwise: no such process, or vLLM's own memory): the runtime, one copy of the weights in the
    sampler's dtype (gspo.rollout.subprocess), and the larger of a rollout's KV cache and logits
    (:func:`_sampling_bytes`, as in the trainer's sampling) and a push part being received (its pickled bytes
    and the arrays unpickled from them)."""
    if not run.sampler_process or run.engine != "hf":
        return None
    transients = {_sampling_name(run): _sampling_bytes(model, run), "weight push": 2 * _part_bytes(model, run)}
    name = max(transients, key=transients.get)
    return Estimate({"runtime": CUDA_RUNTIME_BYTES if run.device == "cuda" else CPU_RUNTIME_BYTES,
                     "weights": BYTES[run.sampler] * model.params, name: transients[name]})


def _push_bytes(model: ModelShape, run: RunShape) -> int:
    """A whole weight push to the sampler process: the built-in engine's in its dtype, vLLM's in float32."""
    return BYTES[run.sampler if run.engine == "hf" else "float32"] * model.params


def _part_bytes(model: ModelShape, run: RunShape) -> int:
    """The largest part of a push: :data:`PUSH_BYTES` plus the tensor that crosses it (the embedding at most)."""
    b = _push_bytes(model, run) // model.params
    return min(_push_bytes(model, run), PUSH_BYTES + b * model.vocab * model.hidden)


def _gathered_bytes(model: ModelShape, run: RunShape, grads: bool = True) -> int:
    """FSDP2's unsharded parameters during a forward / backward: the root's (embeddings, head, final norm; not
    resharded between the forward and the backward, nor during a rollout through the shards) and two decoder
    layers' (the one computing and the one prefetched), in the compute dtype (``MixedPrecisionPolicy(param_dtype)``),
    plus (``grads``) one layer's unsharded gradient in that dtype and in float32 for the reduce-scatter
    (``reduce_dtype=float32``)."""
    b = BYTES[run.compute]
    layer = model.attention_params + model.mlp_params + 2 * model.hidden
    root = model.vocab * model.hidden * (1 if model.tied else 2) + model.hidden
    return b * (root + 2 * layer) + ((b + 4) * layer if grads else 0)


def _no_grad_bytes(model: ModelShape, run: RunShape, params: int) -> int:
    """A pi_old / reference pass: the weight casts alive at once (:func:`_cast_bytes`) and the LM head's logits
    (:func:`_head_bytes`); the body's activations are freed layer by layer."""
    return _cast_bytes(model, run, params) + _head_bytes(model, run)


def _head_bytes(model: ModelShape, run: RunShape) -> int:
    """The chunked LM head's forward (gspo.logprobs): each chunk's (C, V) logits in the compute dtype and their
    float32 copy, while the previous chunk's float32 logits are still referenced by the loop (two chunks alive
    once the completion positions pass one chunk). Measured on the CPU (103M shape, 4 x 519 tokens, one
    no-grad pass): +0.61 GiB in float32, +0.94 GiB in bfloat16 with its 0.19 GiB of casts; this counts 0.58
    and 0.91."""
    completion = max(run.micro_batch_tokens // run.sequence_tokens * run.response_tokens, 1)
    first = min(completion, LM_HEAD_CHUNK_TOKENS)
    second = min(completion - first, LM_HEAD_CHUNK_TOKENS)
    newest = second or first
    low = BYTES[run.compute] if run.compute != "float32" else 0
    return model.vocab * (4 * (first + second) + low * newest)


def _prepacked(run: RunShape) -> bool:
    """Whether the built-in engine prepacks its weights for the rollout (a CPU, bfloat16: gspo.rollout.native)."""
    return run.device == "cpu" and run.sampler == "bfloat16"


def _sampling_name(run: RunShape) -> str:
    return "KV cache + logits" + (" + packed weights" if _prepacked(run) else "")


def _sampling_bytes(model: ModelShape, run: RunShape) -> int:
    """KV cache of every local response at full length, plus a few (rows, V) float32 logits buffers, plus on a
    CPU in bfloat16 the native decoder's prepacked copy of the weights (:attr:`ModelShape.decode_params`)."""
    kv = run.responses * model.layers * 2 * model.kv_heads * model.head_dim * run.sequence_tokens * BYTES[run.sampler]
    packed = BYTES[run.sampler] * model.decode_params if _prepacked(run) else 0
    return kv + 3 * run.responses * model.vocab * 4 + packed


def _training_bytes(model: ModelShape, run: RunShape, params: int) -> int:
    """One micro-batch's forward + backward: the weight casts alive at once (:func:`_cast_bytes`), plus the
    larger of the saved activations with the LM head's logits (:func:`_head_bytes`, the end of the forward:
    measured there on the CPU in bfloat16) and the embedding's (V, hidden) float32 gradient made before it is
    added into ``.grad`` (the end of the backward, activations freed; with accumulation, the new one is added).
    None where the embedding is tied to the head, on the CPU outside FSDP2: its backward gives sparse rows, added
    into the head's gradient in place (gspo.trainer.tied_embedding)."""
    activations = run.micro_batch_tokens * model.activation_bytes_per_token(run.compute, run.checkpointing)
    sparse_rows = model.tied and run.device == "cpu" and not (run.strategy == "fsdp" and run.processes > 1)
    embedding_grad = 0 if run.lora_rank or sparse_rows else 4 * model.vocab * model.hidden
    return int(_cast_bytes(model, run, params) + max(activations + _head_bytes(model, run), embedding_grad))


def _cast_bytes(model: ModelShape, run: RunShape, params: int) -> int:
    """Compute-dtype casts of the weights alive at once under autocast. gspo runs autocast without its cache and
    recasts in the backward the weight casts autograd saves for it (gspo.trainer.recast), so what is alive is the
    chunked LM head's cast of its weight (kept from its forward to its backward) and one layer's casts. With
    LoRA the frozen base weights' casts have no autograd history to recast from: autograd keeps every one
    through the backward. None in float32, and none under FSDP2, whose gathered weights are in the compute
    dtype already."""
    if run.compute == "float32" or (run.strategy == "fsdp" and run.processes > 1):
        return 0
    if run.lora_rank:
        return BYTES[run.compute] * (params - (0 if model.tied else model.vocab * model.hidden))
    return BYTES[run.compute] * (model.vocab * model.hidden + model.attention_params + model.mlp_params)
