"""``GRPOConfig``: TRL's option names and defaults (TRL 1.16 on transformers 5), read by gspo.

Only the fields gspo maps (or accepts without effect) exist; any other keyword is a :class:`ConfigError`
naming it. The dataclass only stores and checks what TRL's own ``__post_init__`` checks (the batch
arithmetic, ``scale_rewards``); what each field becomes in gspo's config is :mod:`gspo.trl.mapping`'s job,
and docs/trl.md has the table. Defaults are TRL's, including the ones a gspo user would not pick
(``learning_rate=1e-6``, ``max_completion_length=512``, ``loss_type="dapo"``, ``epsilon=0.2``, seed 42,
``lr_scheduler_type="linear"``, ``gradient_checkpointing=True``), so that a ported script trains as it did.
Exceptions: ``bf16=None`` means bfloat16 on a GPU and float32 on the CPU (TRL: bfloat16 everywhere), and
``vllm_gpu_memory_utilization=None`` lets gspo size vLLM's memory (TRL: 0.3).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from gspo.errors import ConfigError
from gspo.suggest import did_you_mean

DEFAULT_OUTPUT_DIR = "trainer_output"  # transformers' TrainingArguments default


@dataclass(repr=False)
class _Fields:
    # -- model and data ---------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where save_model() writes by default; gspo's run (metrics, checkpoints) goes to output_dir/gspo."""
    model_init_kwargs: dict | None = None
    max_prompt_length: int | None = None
    """Removed from TRL in 0.28; here a check: a longer prompt is an error (gspo never truncates)."""
    shuffle_dataset: bool = True
    remove_unused_columns: bool | None = False  # no effect: every column reaches the rewards
    num_generations: int = 8
    num_generations_eval: int | None = None
    max_completion_length: int = 512
    # -- generation ---------------------------------------------------------------------------------------
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None
    chat_template_kwargs: dict | None = None
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_server_base_url: str | None = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_gpu_memory_utilization: float | None = None
    """None (TRL: 0.3) = gspo decides (``rollout.vllm_gpu_memory`` auto: colocated, what training leaves, at
    most 0.85, since gspo's engine sleeps during the update; a server on its own GPU, 0.9). TRL's 0.3 keeps
    room for training beside an engine that holds its memory through the update; a value is passed on."""
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    # -- the objective ------------------------------------------------------------------------------------
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    loss_type: str = "dapo"
    scale_rewards: Any = "group"
    reward_weights: list[float] | None = None
    multi_objective_aggregation: str = "sum_then_normalize"
    mask_truncated_completions: bool = False
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = False
    # -- optimisation (transformers' TrainingArguments, TRL's defaults where TRL overrides them) ----------
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    warmup_ratio: float | None = None  # transformers 4 scripts; transformers 5 folds it into warmup_steps < 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    bf16: bool | None = None
    fp16: bool = False
    gradient_checkpointing: bool = True
    use_cpu: bool = False
    # -- logging, saving, evaluation ----------------------------------------------------------------------
    logging_steps: float = 10
    logging_first_step: bool = False
    logging_strategy: str = "steps"
    report_to: Any = "none"
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    eval_strategy: str = "no"
    eval_steps: float | None = None
    push_to_hub: bool = False
    # accepted, no effect on training (display and data loading)
    run_name: str | None = None
    logging_dir: str | None = None
    disable_tqdm: bool = False
    log_completions: bool = False
    num_completions_to_print: int | None = None
    per_device_eval_batch_size: int = 8
    dataloader_num_workers: int = 0
    # -- gspo's own config keys, applied last ({"loss.overlong_buffer": 4}): what TRL has no name for -----
    gspo_config: dict = field(default_factory=dict)


FIELDS = tuple(f.name for f in dataclasses.fields(_Fields))
# Accepted for TRL's sake but without effect on the run (their values reach callbacks through `args`).
NO_EFFECT = ("remove_unused_columns", "run_name", "logging_dir", "disable_tqdm", "log_completions",
             "num_completions_to_print", "per_device_eval_batch_size", "dataloader_num_workers")


class GRPOConfig(_Fields):
    """TRL's ``GRPOConfig`` for :class:`gspo.trl.GRPOTrainer` (module docstring; docs/trl.md maps each field).

    ``GRPOConfig(output_dir, **fields)``; an unknown or unmapped field raises :class:`ConfigError`.
    After construction ``generation_batch_size`` and ``steps_per_generation`` are both set, as in TRL.
    """

    def __init__(self, output_dir: str | None = None, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in FIELDS:
                raise ConfigError(_unknown_field(name))
        super().__init__(output_dir=output_dir, **kwargs)
        self.__post_init__()  # _Fields' generated __init__ does not call it: it is defined on this subclass

    def __post_init__(self) -> None:
        """TRL's own checks and derived values (trl/trainer/grpo_config.py, ``__post_init__``)."""
        self.output_dir = self.output_dir or DEFAULT_OUTPUT_DIR
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        world, per_device = self.world_size, self.per_device_train_batch_size
        for name in ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"GRPOConfig({name}={getattr(self, name)!r}): must be a positive integer")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("GRPOConfig: 'generation_batch_size' and 'steps_per_generation' can not be both "
                              "configured at the same time (as in TRL); set one")
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = per_device * world * self.steps_per_generation
        elif self.generation_batch_size % (per_device * world):
            raise ConfigError(f"GRPOConfig(generation_batch_size={self.generation_batch_size}) must be divisible by "
                              f"the global batch size per_device_train_batch_size x processes = {per_device * world}")
        else:
            self.steps_per_generation = self.generation_batch_size // (per_device * world)
        if self.generation_batch_size % self.num_generations:
            raise ConfigError(
                f"GRPOConfig: generation_batch_size ({self.generation_batch_size} = per_device_train_batch_size "
                f"{per_device} x {world} processes x steps_per_generation {self.steps_per_generation}) must be "
                f"divisible by num_generations ({self.num_generations}): a rollout batch holds whole groups")
        if self.num_generations < 2:
            raise ConfigError(f"GRPOConfig(num_generations={self.num_generations}): group advantages need at "
                              "least 2 generations per prompt")

    @property
    def world_size(self) -> int:
        """Processes of this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what transformers' ``TrainingArguments.to_dict`` gives callbacks)."""
        return dataclasses.asdict(self)

    def __repr__(self) -> str:
        changed = [f"{name}={getattr(self, name)!r}" for name in FIELDS
                   if getattr(self, name) != _DEFAULTS.get(name, getattr(self, name))]
        return f"GRPOConfig({', '.join(changed)})"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(_Fields) if f.default is not dataclasses.MISSING}


def _unknown_field(name: str) -> str:
    hint = did_you_mean(name, FIELDS)
    return (f"GRPOConfig({name}=...): gspo.trl does not map TRL's '{name}'.{hint} docs/trl.md lists the fields it "
            "maps and why the others are refused; remove it, or set gspo's own config keys with "
            "gspo_config={'optim.lr': ...}")
