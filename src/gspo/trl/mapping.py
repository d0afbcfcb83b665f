"""TRL's ``GRPOConfig`` -> gspo's config keys, with the differences said and the impossible refused.

:func:`plan` is the whole translation: a pure function of the config and the dataset sizes, returning the
dotted gspo keys, the warnings to show and the step arithmetic the callbacks need. The units differ:

- TRL's ``max_steps``, ``logging_steps``, ``save_steps``, ``eval_steps`` and ``global_step`` count
  **optimizer steps**; a gspo step is one **rollout batch** (``rollout.prompts_per_step`` x
  ``rollout.group_size`` responses) followed by ``optim.minibatches`` x ``optim.epochs`` optimizer steps.
  One gspo step = ``steps_per_generation / gradient_accumulation_steps x num_iterations`` TRL steps.
- TRL's ``per_device_train_batch_size`` counts completions per process and micro-batch; gspo names the
  global rollout batch in prompts (``generation_batch_size / num_generations``).

Every refusal is a :class:`ConfigError` that names the field, why gspo has no equivalent and what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gspo.errors import ConfigError
from gspo.suggest import TRL_KEYS
from gspo.trl.config import GRPOConfig

RUN_SUBDIR = "gspo"  # gspo's run directory inside output_dir (save_model writes the model at output_dir itself)
# (loss_type, importance_sampling_level) -> gspo's algorithm, where the two compute the same objective.
OBJECTIVES = {("grpo", "token"): "grpo", ("grpo", "sequence"): "gspo", ("dapo", "token"): "dapo",
              ("bnpo", "token"): "dapo", ("dr_grpo", "token"): "dr_grpo", ("cispo", "token"): "cispo",
              ("sapo", "token"): "sapo", ("luspo", "sequence"): "luspo", ("luspo", "token"): "luspo"}
# With importance_sampling_level="sequence" these TRL losses sum a response's sequence term over its tokens.
LENGTH_WEIGHTED = ("dapo", "bnpo", "dr_grpo")
SEQUENCE_CLIP_HINT = 0.01  # a sequence-level clip wider than this almost never acts (GSPO uses 3e-4 / 4e-4)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # gspo's optimizer is torch's AdamW (fused where it can)
TRACKERS = ("tensorboard", "wandb", "mlflow")
VLLM_CORRECTIONS = {"token_truncate": "tis", "token_mask": "mis", "sequence_truncate": "seq_tis",
                    "sequence_mask": "seq_mis"}  # TRL's vllm_importance_sampling_mode -> gspo's correction.mode
IGNORED_MODEL_KWARGS = ("dtype", "torch_dtype", "attn_implementation")


@dataclass
class Plan:
    """What a :class:`GRPOConfig` becomes: gspo config keys, warnings, and TRL's step units."""

    overrides: dict[str, Any]
    updates_per_step: int  # optimizer steps (TRL's steps) per gspo step
    steps: int  # gspo steps (rollout batches)
    warnings: list[str] = field(default_factory=list)

    @property
    def max_optimizer_steps(self) -> int:
        return self.steps * self.updates_per_step


def plan(args: GRPOConfig, *, train_rows: int | None, eval_rows: int = 0, cuda: bool = False) -> Plan:
    """Translate ``args``; ``train_rows`` / ``eval_rows``: dataset sizes (None: unknown), ``cuda``: a GPU is used."""
    out: dict[str, Any] = {"seed": args.seed, "run_dir": f"{args.output_dir}/{RUN_SUBDIR}"}
    warnings: list[str] = []
    _refuse_unsupported(args)
    out.update(_objective(args, warnings))
    prompts = args.generation_batch_size // args.num_generations
    if args.steps_per_generation % args.gradient_accumulation_steps:
        raise ConfigError(
            f"GRPOConfig: steps_per_generation={args.steps_per_generation} is not a multiple of "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}: gspo's optimizer steps each take whole "
            "slices of one rollout batch; make steps_per_generation a multiple of gradient_accumulation_steps")
    minibatches = args.steps_per_generation // args.gradient_accumulation_steps
    updates = minibatches * args.num_iterations
    out.update({TRL_KEYS["num_generations"]: args.num_generations, "rollout.prompts_per_step": prompts,
                "optim.minibatches": minibatches, "optim.epochs": args.num_iterations,
                "optim.micro_batch_size": args.per_device_train_batch_size if args.gradient_accumulation_steps > 1
                else 0})
    per_epoch = None if train_rows is None else train_rows // prompts  # rollout batches per pass over the data
    steps = _steps(args, updates, prompts, train_rows, per_epoch, warnings)
    total = steps * updates
    out["steps"] = steps

    def gspo_steps(trl_steps: float) -> int:  # TRL optimizer steps (a fraction < 1: of the run) -> gspo steps
        optimizer_steps = trl_steps * total if trl_steps < 1 else trl_steps
        return max(1, math.ceil(optimizer_steps / updates))

    out.update(_sampling(args, warnings))
    out.update(_optimizer(args, total, cuda))
    out.update(_schedule_of_saves_and_logs(args, gspo_steps, per_epoch, eval_rows))
    out.update(_loss_extras(args, gspo_steps))
    out.update(_trackers(args.report_to))
    if args.use_cpu:
        out["device"] = "cpu"
    for key, value in (args.model_init_kwargs or {}).items():
        if key not in IGNORED_MODEL_KWARGS:
            raise ConfigError(f"GRPOConfig(model_init_kwargs={{{key!r}: ...}}): gspo loads models itself (local files, "
                              f"no remote code); it accepts only {', '.join(IGNORED_MODEL_KWARGS)}, and ignores them")
        warnings.append(f"model_init_kwargs[{key!r}] is ignored: gspo keeps float32 master weights (bf16=True "
                        "trains under bfloat16 autocast) and picks the attention implementation itself")
    out.update(dict(args.gspo_config))
    return Plan(out, updates, steps, warnings)


def _objective(args: GRPOConfig, warnings: list[str]) -> dict[str, Any]:
    """``algorithm`` and its hyperparameters from ``loss_type`` x ``importance_sampling_level``."""
    loss, level = args.loss_type, args.importance_sampling_level
    if level not in ("token", "sequence"):
        raise ConfigError(f"GRPOConfig(importance_sampling_level={level!r}) must be 'token' or 'sequence'")
    if level == "sequence" and loss in LENGTH_WEIGHTED:
        warnings.append(
            f"loss_type={loss!r} with importance_sampling_level='sequence' is not GSPO: TRL sums each response's "
            "sequence-level term over its tokens, so a response counts in proportion to its length. gspo runs the "
            "exact GSPO objective instead (algorithm=gspo: each response weighted once, GSPO paper eq. 5), which is "
            "TRL's own advice (loss_type='grpo'); set loss_type='grpo' to say so. A length-weighted sequence "
            "objective is loss_type='luspo'.")
        algorithm = "gspo"
    elif (loss, level) in OBJECTIVES:
        algorithm = OBJECTIVES[(loss, level)]
    elif loss in {name for name, _ in OBJECTIVES}:
        raise ConfigError(f"GRPOConfig(loss_type={loss!r}, importance_sampling_level={level!r}): gspo has no "
                          f"sequence-level {loss}; use importance_sampling_level='token' (algorithm={loss}) or "
                          "loss_type='grpo' with 'sequence' (algorithm=gspo)")
    else:
        known = sorted({name for name, _ in OBJECTIVES})
        raise ConfigError(f"GRPOConfig(loss_type={loss!r}) has no gspo equivalent (gspo maps {', '.join(known)}; "
                          "vespo is not implemented)")
    if loss == "luspo" and level == "token":
        warnings.append("loss_type='luspo' with importance_sampling_level='token': gspo's luspo uses sequence-level "
                        "ratios as the LUSPO paper (and TRL's warning) say; set importance_sampling_level='sequence'")
    out: dict[str, Any] = {"algorithm": algorithm}
    if algorithm == "dapo":  # TRL's "dapo" / "bnpo" name the aggregation only: no dynamic sampling
        out["loss.dynamic_sampling"] = False
    if algorithm == "sapo":
        out["loss.params"] = [f"tau_pos={args.sapo_temperature_pos}", f"tau_neg={args.sapo_temperature_neg}"]
    elif algorithm == "cispo":  # TRL caps the IS weight at epsilon_high, no lower bound; gspo: [1 - low, 1 + high]
        cap = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        if cap <= 1:
            raise ConfigError(f"GRPOConfig(loss_type='cispo'): the importance weight is capped at epsilon_high "
                              f"(here {cap}, TRL's fallback to epsilon), which is below 1 and would shrink every "
                              "token's gradient; set epsilon_high (ScaleRL: 5.0)")
        out.update({"loss.clip_low": 1.0, "loss.clip_high": cap - 1.0})
    else:
        high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        out.update({"loss.clip_low": args.epsilon, "loss.clip_high": high})
        if algorithm in ("gspo", "luspo") and max(args.epsilon, high) > SEQUENCE_CLIP_HINT:
            warnings.append(f"epsilon={args.epsilon}, epsilon_high={high} on sequence-level ratios: a sequence "
                            "ratio is a geometric mean and rarely leaves [0.8, 1.2], so this clip almost never acts. "
                            "The GSPO paper and TRL's GSPO recipe use epsilon=3e-4, epsilon_high=4e-4")
    return out


def _steps(args, updates: int, prompts: int, train_rows: int | None, per_epoch: int | None, warnings) -> int:
    """gspo steps from ``max_steps`` (TRL optimizer steps) or ``num_train_epochs`` (passes over the data)."""
    if args.max_steps > 0:
        steps = math.ceil(args.max_steps / updates)
        if args.max_steps % updates:
            warnings.append(f"max_steps={args.max_steps} optimizer steps is not a multiple of the {updates} taken "
                            f"per rollout batch; gspo trains whole rollout batches: {steps * updates} optimizer steps")
        return steps
    if train_rows is None:
        raise ConfigError("GRPOConfig: set max_steps; num_train_epochs needs a train_dataset of known length")
    if not per_epoch:
        raise ConfigError(f"train_dataset has {train_rows} prompts, fewer than one generation batch of {prompts} "
                          "prompts (generation_batch_size / num_generations); add rows or use a smaller batch")
    return max(1, math.ceil(args.num_train_epochs * per_epoch))


def _sampling(args: GRPOConfig, warnings: list[str]) -> dict[str, Any]:
    out = {"rollout.max_new_tokens": args.max_completion_length, "rollout.temperature": args.temperature,
           "rollout.top_p": args.top_p, "rollout.top_k": args.top_k}
    if not args.use_vllm:
        return out
    if args.vllm_mode == "colocate":
        out["rollout.engine"] = "vllm"
    elif args.vllm_mode == "server":
        out["rollout.engine"] = "vllm-server"
        url = args.vllm_server_base_url
        if url is None and (args.vllm_server_host, args.vllm_server_port) != ("0.0.0.0", 8000):
            url = f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        if url:
            out["rollout.server_url"] = url
            warnings.append(f"vllm_mode='server' at {url}: gspo talks to vLLM's own OpenAI server (`vllm serve`, "
                            "VLLM_SERVER_DEV_MODE=1 for weight reloads), not to `trl vllm-serve` (docs/vllm.md)")
        else:
            warnings.append("vllm_mode='server' without vllm_server_base_url: gspo starts and stops a vLLM server "
                            "itself (a running `trl vllm-serve` is not used)")
    else:
        raise ConfigError(f"GRPOConfig(vllm_mode={args.vllm_mode!r}) must be 'colocate' or 'server'")
    if args.vllm_gpu_memory_utilization is not None:  # None: gspo's auto share (its engine sleeps in the update)
        out["rollout.vllm_gpu_memory"] = args.vllm_gpu_memory_utilization
    if args.vllm_importance_sampling_correction:
        out.update(_vllm_correction(args))
    return out


def _vllm_correction(args: GRPOConfig) -> dict[str, Any]:
    """TRL's correction between vLLM's and the trainer's log-probabilities as gspo's ``correction.*``."""
    mode, low, high = args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min, \
        args.vllm_importance_sampling_clip_max
    if mode not in VLLM_CORRECTIONS:
        raise ConfigError(f"GRPOConfig(vllm_importance_sampling_mode={mode!r}) must be one of "
                          f"{', '.join(VLLM_CORRECTIONS)}")
    if args.off_policy_mask_threshold is not None:
        raise ConfigError("GRPOConfig: off_policy_mask_threshold and vllm_importance_sampling_correction are two "
                          "corrections; gspo applies one (correction.mode): set vllm_importance_sampling_correction="
                          "False or drop off_policy_mask_threshold")
    if high is None:
        raise ConfigError("GRPOConfig(vllm_importance_sampling_clip_max=None): gspo's corrections need an upper bound")
    out: dict[str, Any] = {"correction.mode": VLLM_CORRECTIONS[mode]}
    if mode.endswith("truncate"):
        if low is not None:
            raise ConfigError(f"GRPOConfig(vllm_importance_sampling_clip_min={low}) with {mode!r}: gspo's truncated "
                              "corrections cap from above only; drop clip_min or use a *_mask mode")
        out["correction.threshold"] = high
    else:
        out.update({"correction.low": 0.0 if low is None else low, "correction.high": high})
    return out


def _optimizer(args: GRPOConfig, total: int, cuda: bool) -> dict[str, Any]:
    if args.lr_scheduler_type not in SCHEDULES:
        raise ConfigError(f"GRPOConfig(lr_scheduler_type={args.lr_scheduler_type!r}): gspo has "
                          f"{', '.join(SCHEDULES)} (optim.schedule)")
    if args.optim not in OPTIMIZERS:
        raise ConfigError(f"GRPOConfig(optim={args.optim!r}): gspo trains with torch's AdamW ({', '.join(OPTIMIZERS)})")
    if (args.adam_beta1, args.adam_beta2) != (0.9, 0.999):
        raise ConfigError("GRPOConfig(adam_beta1 / adam_beta2): gspo's AdamW uses betas (0.9, 0.999); "
                          "remove these fields")
    if args.fp16:
        raise ConfigError("GRPOConfig(fp16=True): gspo trains in float32 or under bfloat16 autocast (bf16=True); "
                          "float16 needs loss scaling, which gspo does not do")
    warmup = args.warmup_steps * total if 0 < args.warmup_steps < 1 else args.warmup_steps
    if args.warmup_ratio:
        warmup = args.warmup_ratio * total
    bf16 = cuda if args.bf16 is None else args.bf16
    return {"optim.lr": args.learning_rate, "optim.weight_decay": args.weight_decay, "optim.adam_eps": args.adam_epsilon,
            "optim.max_grad_norm": args.max_grad_norm, "optim.schedule": SCHEDULES[args.lr_scheduler_type],
            "optim.warmup_steps": math.ceil(warmup), "optim.dtype": "bfloat16" if bf16 else "float32",
            "optim.gradient_checkpointing": "true" if args.gradient_checkpointing else "false"}


def _schedule_of_saves_and_logs(args: GRPOConfig, gspo_steps, per_epoch: int | None, eval_rows: int) -> dict:
    """``log.every``, ``checkpoint.*`` and ``eval.*`` in gspo steps."""
    out: dict[str, Any] = {"log.every": gspo_steps(args.logging_steps)}

    def every(strategy: str, steps: float | None, what: str) -> int:
        if strategy == "no":
            return 0
        if strategy == "steps":
            return gspo_steps(steps if steps is not None else args.logging_steps)
        if strategy == "epoch" and per_epoch:
            return per_epoch
        raise ConfigError(f"GRPOConfig({what}_strategy={strategy!r}): gspo maps 'no', 'steps' and 'epoch' (with a "
                          "train_dataset of known length)")

    out["checkpoint.every"] = every(args.save_strategy, args.save_steps, "save")
    if args.save_total_limit is not None:
        out["checkpoint.keep_last"] = args.save_total_limit
    # TRL evaluates only the eval_dataset given (none: no evaluation, and every row trains)
    out.update({"eval.size": eval_rows, "eval.every": every(args.eval_strategy, args.eval_steps, "eval") if eval_rows
                else 0, "eval.samples": args.num_generations_eval or args.num_generations, "eval.greedy": False})
    return out


def _loss_extras(args: GRPOConfig, gspo_steps) -> dict[str, Any]:
    if args.scale_rewards not in ("group", "batch", "none"):
        raise ConfigError(f"GRPOConfig(scale_rewards={args.scale_rewards!r}) must be 'group', 'batch', 'none', "
                          "True or False")
    out: dict[str, Any] = {"loss.beta": args.beta, "loss.advantage_scale": args.scale_rewards}
    if args.sync_ref_model:
        if args.ref_model_mixup_alpha != 1.0:
            raise ConfigError(f"GRPOConfig(sync_ref_model=True, ref_model_mixup_alpha={args.ref_model_mixup_alpha}): "
                              "gspo copies the policy into the reference (alpha 1.0); set ref_model_mixup_alpha=1.0")
        out["loss.ref_refresh_steps"] = gspo_steps(args.ref_model_sync_steps)
    if args.off_policy_mask_threshold is not None and not args.use_vllm:
        out.update({"correction.mode": "opsm", "correction.delta": args.off_policy_mask_threshold})
    return out


def _trackers(report_to: Any) -> dict[str, Any]:
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = [n for n in names if n not in (None, "none")]
    if names == ["all"]:
        return {"log.tensorboard": True, "log.trackers": []}  # TensorBoard when installed; metrics.jsonl always
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"GRPOConfig(report_to={name!r}): gspo reports to {', '.join(TRACKERS)} (and always "
                              "writes metrics.jsonl); use one of those or 'none'")
    return {"log.tensorboard": "tensorboard" in names, "log.trackers": names}


# field -> (value that is fine, why anything else is refused and what to do instead)
REFUSED = {
    "min_p": (None, "gspo samples with temperature, top_p and top_k only, the filters its training "
                    "log-probabilities reproduce; a min_p filter would make every ratio off-policy"),
    "repetition_penalty": (1.0, "a repetition penalty samples from another distribution than the policy whose "
                                "log-probabilities gspo trains; the ratios would be biased"),
    "generation_kwargs": (None, "extra generation settings change the sampling distribution behind gspo's back; "
                                "gspo's sampling is temperature / top_p / top_k"),
    "chat_template_kwargs": (None, "gspo renders prompts with the tokenizer's chat template as it is; put template "
                                   "options in the template or the prompt"),
    "mask_truncated_completions": (False, "gspo has no option to drop truncated completions from the loss; DAPO's "
                                          "soft overlong penalty is gspo_config={'loss.overlong_buffer': N}"),
    "delta": (None, "gspo has no two-sided (INTELLECT-2) clip of the ratio"),
    "multi_objective_aggregation": ("sum_then_normalize", "gspo sums the weighted rewards, then normalises"),
    "top_entropy_quantile": (1.0, "gspo has no entropy-quantile token mask"),
    "entropy_coef": (0.0, "gspo has no entropy bonus"),
    "use_bias_correction_kl": (False, "gspo's KL term has no importance-sampling correction"),
    "shuffle_dataset": (True, "gspo always reads the data in seeded shuffled epochs (exact resume needs it)"),
    "push_to_hub": (False, "gspo neither downloads nor uploads; save_model() writes a local directory"),
    "logging_strategy": ("steps", "gspo logs every logging_steps; set logging_steps instead"),
}


def _refuse_unsupported(args: GRPOConfig) -> None:
    for name, (fine, why) in REFUSED.items():
        value = getattr(args, name)
        if value != fine and not (fine is None and not value):
            raise ConfigError(f"GRPOConfig({name}={value!r}) has no gspo equivalent: {why}")


# PEFT LoraConfig fields gspo's LoRA (lora.*) cannot express, with the value that is fine.
LORA_FIXED = {"bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
              "exclude_modules": None, "trainable_token_indices": None, "lora_bias": False, "target_parameters": None}


def lora_overrides(peft_config: Any, model_type: str | None) -> dict[str, Any]:
    """gspo's ``lora.*`` keys for a PEFT ``LoraConfig`` (``target_modules=None``: PEFT's default for the model)."""
    if type(peft_config).__name__ != "LoraConfig":
        raise ConfigError(f"GRPOTrainer(peft_config={type(peft_config).__name__}(...)): gspo trains LoRA adapters "
                          "only; pass a peft.LoraConfig")
    for name, fine in LORA_FIXED.items():
        value = getattr(peft_config, name, fine)
        if value != fine and not (fine in (None, {}) and not value):
            raise ConfigError(f"peft_config.{name}={value!r}: gspo's LoRA has plain adapters on the target modules "
                              f"only ({name}={fine!r}); drop it")
    targets = peft_config.target_modules
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            raise ConfigError(f"peft_config.target_modules=None: PEFT has no default for model type {model_type!r}; "
                              "name the modules (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")
        targets = DEFAULTS[model_type]
    elif isinstance(targets, str) and targets != "all-linear":
        raise ConfigError(f"peft_config.target_modules={targets!r}: a regular expression; gspo takes module names "
                          "(a list) or 'all-linear'")
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return {"lora.rank": peft_config.r, "lora.alpha": peft_config.lora_alpha, "lora.dropout": peft_config.lora_dropout,
            "lora.target_modules": targets}
