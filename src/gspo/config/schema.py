"""The run configuration schema: one typed source of truth.

Nested dataclasses, loadable from YAML, overridable from the command line with dotted
``key=value`` pairs (``algorithm=grpo rollout.group_size=8``), validated up front: unknown keys and
out-of-range values raise :class:`gspo.errors.ConfigError` naming the key, the allowed values and the
closest valid key. Every field is documented right under it; ``gspo train --help`` prints them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gspo.algorithms.catalogue import CORRECTION_DEFAULTS, SPECS

# Read from the objectives' catalogue (the one place their names and paper defaults are written).
ALGORITHMS = tuple(SPECS)
CLIP_DEFAULTS = {name: (spec.hyperparameters["clip_low"], spec.hyperparameters["clip_high"])
                 for name, spec in SPECS.items() if "clip_low" in spec.hyperparameters}


@dataclass
class DataConfig:
    task: str = "arithmetic"
    """Built-in task (:data:`gspo.tasks.registry.BUILTIN_TASKS`); ignored when ``data.path`` is set."""
    path: str = ""
    """Local JSONL / CSV / Parquet file or a saved Hugging Face dataset directory."""
    prompt_column: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages)."""
    answer_column: str = "answer"
    """Column holding the reference answer passed to rewards as ``answer``."""
    eval_path: str = ""
    """Held-out file or directory; empty = the task's held-out split, or ``eval.size`` rows of the dataset drawn
    at random with ``seed`` (at most a fifth of its rows; the start line says how many)."""
    system_prompt: str = ""
    """System message prepended when the prompt is rendered with the tokenizer's chat template."""
    chat_template: str = "auto"
    """auto: use the tokenizer's chat template when it has one; always; never."""
    max_prompt_tokens: int = 0
    """Longest prompt in tokens; a longer one stops the run with an error naming it. 0 = auto: the model's
    context minus rollout.max_new_tokens; with vLLM (single-turn tasks), twice the longest prompt among the
    held-out rows and the first 1024 training rows, rounded up to 256 (vLLM's max_model_len is this plus
    rollout.max_new_tokens)."""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    """Prompts per rollout batch (P); the batch holds P x group_size responses."""
    group_size: int = 8
    """Responses sampled per prompt (G); advantages are normalised within each group."""
    max_new_tokens: int = 8
    """Generation limit per response."""
    temperature: float = 1.0
    """Sampling temperature; training log-probabilities use logits / temperature too."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    engine: str = "hf"
    """Rollout engine: hf (in-process, transformers' model or gspo's native decode step), vllm (vLLM in
    this process, colocated with training), vllm-server (a vLLM server: started by gspo on 127.0.0.1, or
    the one at rollout.server_url)."""
    server_url: str = ""
    """rollout.engine=vllm-server: URL of a running vLLM server (empty = gspo starts and stops one)."""
    vllm_kv_cache_gb: int = 1
    """vLLM on a CPU: whole GiB of RAM for its KV cache (VLLM_CPU_KVCACHE_SPACE; unset, vLLM takes ~92% of RAM)."""
    vllm_gpu_memory: float = 0.0
    """vLLM on a GPU: fraction of GPU memory it takes (gpu_memory_utilization). 0 = auto: colocated with
    training (it sleeps during the update), what training's weights, gradients and optimizer leave, at most
    0.85 (0.6 when unknown); a server gspo starts on a GPU of its own, 0.9."""
    vllm_request_timeout_s: float = 0.0
    """rollout.engine=vllm-server: seconds to wait for one answer (a whole completion, or a weight push);
    0 = 600 + 0.25 per token of rollout.max_new_tokens."""
    engine_dtype: str = "auto"
    """Sampler precision: auto (training's compute dtype, optim.dtype; bfloat16 for vLLM on a GPU), float32,
    bfloat16 or float16 (a separate lower-precision copy, or the vLLM engine's dtype)."""
    ignore_eos: bool = False
    """Never stop at EOS: every response is max_new_tokens long (benchmarks: fixed-length generation)."""
    decoder: str = "auto"
    """Sampler forward: auto (gspo's native decode step for Llama/Mistral/Qwen2/Qwen3, else transformers'),
    native (require it) or hf (always transformers' forward)."""
    sampler_weights: str = "auto"
    """rollout.engine=hf under distributed.strategy=fsdp with 2+ processes: copy (the sampler keeps a whole copy
    of the model in rollout.engine_dtype on every process, refreshed after each update), shards (it samples
    through the sharded model itself: each decoder layer's weights are gathered for every prefill and decode
    step and freed after, as training's forwards do; no whole copy, more communication, transformers' forward)
    or auto (copy when the memory estimate fits with it, else shards; the start line says which). No effect
    on other runs."""
    max_staleness: int = 0
    """Pipelined sampling (docs/pipeline.md): a sampler process generates batch k+s while the trainer
    updates on batch k; batch k is always sampled with the weights after update k-1-s (reproducible, resumable).
    0 = the synchronous loop (sample, then update)."""


@dataclass
class LossConfig:
    clip_low: float | None = None
    """Lower clip range epsilon_low; default: the algorithm's paper value (GSPO 3e-4)."""
    clip_high: float | None = None
    """Upper clip range epsilon_high; default: the algorithm's paper value (GSPO 4e-4)."""
    params: list[str] = field(default_factory=list)
    """Other hyperparameters of the algorithm as name=value (e.g. sapo: tau_pos=1.0,tau_neg=1.05; dppo_tv:
    delta_low=0.2); default: its paper's values (docs/objectives.md lists each algorithm's)."""
    advantage_scale: str = "auto"
    """group: divide by the group std (paper eq. 6); batch: by the batch std; none: only centre; auto: the
    algorithm's paper choice (none for dr_grpo, group for the others)."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference policy (0 = no reference model is kept)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3."""
    ref_refresh_steps: int = 0
    """Copy the policy into the reference model every N steps (0 = keep the initial model)."""
    old_logprobs: str = "auto"
    """recompute: old log-probabilities from a training-model pass; rollout: the sampler's own (paper
    section 5.4); auto: rollout when the sampler is the training module in float32 (they agree to float
    rounding, ~1e-7, so the pass is pure cost), else recompute (bf16 sampler, bf16 training, MoE). Either
    way pi_old is the eval-mode (no dropout) policy."""
    dynamic_sampling: bool | None = None
    """DAPO: drop groups whose rewards are all equal and sample more (default: on for dapo)."""
    overlong_buffer: int = 0
    """DAPO overlong reward shaping buffer L_cache in tokens (0 = off)."""


@dataclass
class CorrectionConfig:
    mode: str = "none"
    """Rollout correction between the engine's and the trainer's old probabilities (docs/objectives.md):
    none; tis / mis (token truncation / masking); seq_tis / seq_mis (sequence, product form); geo_tis /
    geo_mis / geo_reject (sequence, geometric mean); opsm (off-policy sequence masking); bypass (pi_old =
    the engine's log-probabilities, i.e. loss.old_logprobs=rollout)."""
    threshold: float | None = None
    """Truncation cap C of tis / seq_tis / geo_tis (default 2)."""
    low: float | None = None
    """Lower bound of the kept ratio band of mis / seq_mis / geo_mis / geo_reject (default: the mode's)."""
    high: float | None = None
    """Upper bound of that band (default: the mode's)."""
    delta: float | None = None
    """opsm: the mean log-ratio above which a negative-advantage response is dropped (default 1e-4)."""

    def thresholds(self) -> dict[str, float]:
        """The mode's threshold keywords: the configured values, else the mode's defaults."""
        defaults = CORRECTION_DEFAULTS.get(self.mode, {})
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}


AUTO = -1  # what "auto" stands for in the integer fields of AUTO_KEYS (config.json records -1)
AUTO_KEYS = ("eval.every", "optim.micro_batch_tokens")
# string fields that read auto, true or false (a boolean, yes / no / on / off included, becomes "true" / "false")
SWITCH_KEYS = ("optim.gradient_checkpointing",)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (AdamW). RL wants 10-100x less than the warm-start (whose SFT used 2e-3)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant, linear or cosine."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW's epsilon (TRL's adam_epsilon). Comparing runs that differ by float rounding only (process counts,
    micro-batch splits): 1e-8 turns rounding noise in a near-zero gradient element into a step of up to the
    learning rate; a larger value compares the gradients."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 = off)."""
    minibatches: int = 4
    """Optimizer steps per rollout batch (the paper uses 4); later minibatches are off-policy."""
    epochs: int = 1
    """Passes over each rollout batch."""
    micro_batch_size: int = 0
    """Responses per forward/backward (gradient accumulation); 0 = the whole minibatch, cut into
    length-sorted micro-batches where padding costs more than one more forward (models of 50M+
    parameters; smaller ones keep one). Per process: it must divide each process's share of a minibatch."""
    micro_batch_tokens: int = AUTO
    """Token budget per forward/backward: micro-batches are formed from length-sorted responses so that rows x
    padded length stays within it (memory follows tokens, not rows; every no-grad pass is split the same way);
    0 = off (optim.micro_batch_size decides); auto (= -1) = off while the memory estimate of the whole
    minibatch in one forward fits, else the largest budget that fits (the start line says which;
    docs/memory.md). Exclusive with optim.micro_batch_size."""
    dtype: str = "auto"
    """Training compute precision (master weights and optimizer state stay float32): auto (bfloat16 autocast
    for models of 50M+ parameters on CUDA with bf16 or a CPU with AMX / AVX512-BF16 whose measured bf16 GEMM
    pays, else float32, with TF32 matmuls on a CUDA GPU of sm80+; the start line says which and why),
    float32 (true float32, also on a GPU), or bfloat16."""
    gradient_checkpointing: str = "auto"
    """Recompute each decoder layer's activations in the backward: activation memory of about one layer
    for about a third more training compute (benchmarks/README.md). auto, true or false: auto turns it on
    when the memory estimate does not fit without it but does with it, and always on CUDA for models of 1B+
    parameters (TRL's default is on); the start line says which (docs/memory.md)."""
    share_prompts: bool = True
    """Training forwards run each distinct prompt once and reuse its keys/values for all of its responses
    (exact up to float rounding; skipped where no prompt repeats, with activation checkpointing, sliding-window
    attention or MoE routing capture). Off = one full forward per response."""


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=list)
    """Rewards as ``name`` or ``name@weight``; ``module:function`` loads your own; ``rm:<dir>`` scores with a
    local sequence-classification reward model (one forward per step). Empty = the task's rewards."""
    none_policy: str = "zero"
    """What a reward returning None means: zero (counted in metrics) or error."""




@dataclass
class EvalConfig:
    every: int = AUTO
    """Evaluate on held-out prompts every N steps: auto (= -1: 4 times during the run, every steps/5 steps,
    so the accuracy curve has 6 points), 0 = only before and after training."""
    size: int = 200
    """Held-out prompts per evaluation."""
    samples: int = 4
    """Responses per held-out prompt for the sampled accuracy (200 x 4 gives a standard error of about
    1.7 points where one sample per prompt gives 3.5)."""
    greedy: bool = True
    """Also report greedy (temperature 0) accuracy."""


@dataclass
class CheckpointConfig:
    every: int = 50
    """Save a checkpoint every N steps (and always at the end; 0 = only at the end)."""
    keep_last: int = 2
    """How many checkpoints to keep."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank: train PEFT adapters of this rank instead of every weight (0 = full fine-tuning)."""
    alpha: float = 16.0
    """LoRA scale numerator: the adapter adds (alpha / rank) * B A to each adapted weight."""
    dropout: float = 0.0
    """Dropout on the adapters' input (training forwards only; > 0 makes recomputed log-ratios noisy)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: names such as q_proj,v_proj, or all-linear (every linear layer but the LM head)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Also write TensorBoard event files when tensorboard is installed."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers that must be used: tensorboard, wandb, mlflow (metrics.jsonl is always written)."""
    project: str = "gspo"
    """Project (W&B) or experiment (MLflow) name the run is logged under."""
    progress: bool = True
    """Show the live progress bar (on a terminal), or plain progress lines (when output is redirected)."""
    every: int = 10
    """Without a terminal (nohup, a scheduler, | tee): one plain progress line every N steps."""
    samples: int = 4
    """Completions written to samples.jsonl per step."""


@dataclass
class MoEConfig:
    routing_replay: str = "off"
    """Routing Replay for MoE models: off; r2 (experts from the old-policy pass); r3 (rollout pass)."""
    diagnostics: bool = True
    """On MoE models, log expert-activation volatility between behaviour and current policy."""


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    """Data-parallel strategy under torchrun: ddp (replicated weights) or fsdp (FSDP2, sharded)."""


@dataclass
class AgentConfig:  # agents: multi-turn, tool-using tasks (docs/agents.md)
    max_turns: int = 0
    """Model turns per episode of an agent task (data.task=calculator, or a task with an environment);
    0 = the environment's own limit."""
    tool_timeout_s: float = 0.0
    """Wall-clock limit of one tool call in seconds (the model sees a timeout error); 0 = each tool's own."""
    advantages: str = "episode"
    """episode: one group advantage per episode (eq. 6); turn: per-turn advantages from per-turn rewards,
    (B, T), for the objectives that take token advantages (gspo_token, dr_grpo, cispo, sapo, dppo_*)."""


@dataclass
class Config:
    model: str = "tiny-arith"
    """Embedded model name (:data:`gspo.config.load.EMBEDDED_MODELS`) or a local Hugging Face causal-LM
    directory."""
    algorithm: str = "gspo"
    """The objective (:data:`ALGORITHMS`), each with its paper's defaults; docs/objectives.md has their
    equations."""
    steps: int = 200
    """Rollout batches (training steps)."""
    seed: int = 0
    """Seed for sampling, data order and initialisation; a seeded CPU run is reproducible."""
    run_dir: str = ""
    """Output directory; empty = runs/<algorithm>-<model>-<time>."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    cpu_threads: int = 0
    """CPU threads for torch (0 = auto: 1 for models under 50M parameters, whose ops are too small to
    split and slow down sharply when threads contend; torch's default otherwise)."""
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    @property
    def clip_range(self) -> tuple[float | None, float | None]:
        """(clip_low, clip_high) with the algorithm's paper defaults filled in (None without a clip)."""
        low, high = CLIP_DEFAULTS.get(self.algorithm, (None, None))
        return (
            low if self.loss.clip_low is None else self.loss.clip_low,
            high if self.loss.clip_high is None else self.loss.clip_high,
        )

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The algorithm's keyword hyperparameters: paper defaults, then clip_low / clip_high, then loss.params."""
        out = dict(SPECS[self.algorithm].hyperparameters)
        low, high = self.clip_range
        if "clip_low" in out:
            out["clip_low"], out["clip_high"] = low, high
        for item in self.loss.params:
            key, _, value = item.partition("=")
            out[key.strip()] = float(value)
        return out

    @property
    def eval_every(self) -> int:
        """``eval.every`` with auto (-1) resolved: every steps/5 steps (0 for runs under 5 steps)."""
        return self.steps // 5 if self.eval.every == AUTO else self.eval.every

    @property
    def advantage_scale(self) -> str:
        """``loss.advantage_scale`` with auto resolved to the algorithm's paper choice (Dr. GRPO: none)."""
        if self.loss.advantage_scale != "auto":
            return self.loss.advantage_scale
        return SPECS[self.algorithm].advantage_scale if self.algorithm in SPECS else "group"

    @property
    def dynamic_sampling(self) -> bool:
        default = SPECS[self.algorithm].dynamic_sampling if self.algorithm in SPECS else False
        return default if self.loss.dynamic_sampling is None else self.loss.dynamic_sampling

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the algorithm-dependent defaults filled in (what ``config.json`` records)."""
        out = self.to_dict()
        out["loss"]["clip_low"], out["loss"]["clip_high"] = self.clip_range
        out["loss"]["dynamic_sampling"] = self.dynamic_sampling
        out["loss"]["advantage_scale"] = self.advantage_scale
        out["correction"].update(self.correction.thresholds())
        return out

