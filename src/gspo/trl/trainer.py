"""``GRPOTrainer``: TRL's constructor and methods over :class:`gspo.Trainer` (the same run, loop and files).

    from gspo.trl import GRPOConfig, GRPOTrainer      # was: from trl import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(model="path/to/model", reward_funcs=[accuracy], args=GRPOConfig(...),
                          train_dataset=dataset, peft_config=LoraConfig(r=16), callbacks=[MyCallback()])
    trainer.train()
    trainer.save_model()                              # output_dir: an HF directory (LoRA: the adapter, as TRL)

What each argument becomes: ``args`` -> gspo config keys (:mod:`gspo.trl.mapping`, warnings for what
differs, errors for what has no equivalent); ``reward_funcs`` -> batched rewards (:mod:`gspo.trl.rewards`);
``peft_config`` -> ``lora.*``; ``callbacks`` -> :class:`gspo.trl.callbacks.CallbackBridge`. Without an
``eval_dataset`` every row trains and nothing is evaluated (as in TRL); with one, gspo reports held-out
accuracy (the first reward >= 0.5) and mean reward before and after training. gspo's run directory
(``config.json``, ``metrics.jsonl``, ``samples.jsonl``, checkpoints) is ``output_dir/gspo``.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from gspo.errors import ConfigError
from gspo.trl.config import GRPOConfig
from gspo.trl.mapping import RUN_SUBDIR, lora_overrides, plan


class TRLCompatWarning(UserWarning):
    """A TRL option that gspo runs differently (the message says how, and how to say what you mean)."""


class GRPOTrainer:
    """TRL's ``GRPOTrainer`` on gspo (module docstring; docs/trl.md)."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: GRPOConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), peft_config: Any = None, **unsupported: Any) -> None:
        import gspo
        from gspo.trl.callbacks import CallbackBridge
        from gspo.trl.rewards import RewardLogs, gspo_rewards

        _refuse(unsupported, reward_processing_classes, optimizers, model)
        if reward_funcs is None:
            raise ConfigError("GRPOTrainer(reward_funcs=None): give one reward function or a list of them")
        if train_dataset is None:
            raise ConfigError("GRPOTrainer(train_dataset=None): give a datasets.Dataset or a list of dicts with a "
                              "'prompt' column")
        self.args = args if args is not None else GRPOConfig(f"{_model_name(model)}-GRPO")
        self.loaded_model = None if isinstance(model, (str, Path)) else model
        self.processing_class = _tokenizer(model, processing_class)
        rows, held = _records(train_dataset, "train_dataset"), _records(eval_dataset, "eval_dataset")
        self.has_eval = bool(held)
        _check_prompt_lengths(rows, self.processing_class, self.args.max_prompt_length)
        self.plan = plan(self.args, train_rows=len(rows), eval_rows=len(held or ()), cuda=_cuda(self.args))
        overrides = dict(self.plan.overrides)
        if peft_config is not None:
            overrides.update(lora_overrides(peft_config, _model_type(model)))
        source = getattr(self.loaded_model, "name_or_path", "")
        if source and Path(source).is_dir():  # a loaded model: config.json records where it came from
            overrides["model"] = str(source)
        for text in self.plan.warnings:
            warnings.warn(text, TRLCompatWarning, stacklevel=2)
        self.steps_per_epoch = len(rows) // overrides["rollout.prompts_per_step"]
        self.logging_every = max(1, math.ceil(_fraction_of(self.args.logging_steps, self.plan.max_optimizer_steps)))
        self.state = self._new_state()
        self.callbacks = [c() if isinstance(c, type) else c for c in (callbacks or [])]
        self.reward_logs = RewardLogs()
        self.log_metric, self.log_extra = self.reward_logs.log_metric, self.reward_logs.log_extra
        self._bridge = CallbackBridge(self)
        self._trained = False
        self._gspo = gspo.Trainer(
            model=str(model) if self.loaded_model is None else model, tokenizer=self.processing_class,
            train_dataset=rows, eval_dataset=held or None,
            rewards=gspo_rewards(reward_funcs, self.processing_class, self,
                                 device="cuda" if _cuda(self.args) else "cpu"),
            reward_weights=self.args.reward_weights, config=overrides, callbacks=[self._bridge])
        self.config = self._gspo.config  # the validated gspo Config this run uses
        self._bridge.fire("on_init_end")

    # -- TRL's methods -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | None = None, **kwargs: Any):
        """Train; returns transformers' ``TrainOutput(global_step, training_loss, metrics)``.

        ``resume_from_checkpoint=True`` (or ``output_dir``) continues from the newest checkpoint under
        ``output_dir/gspo``; gspo resumes exactly (data position, RNG, optimizer).
        """
        from transformers.trainer_utils import TrainOutput

        if kwargs:
            raise ConfigError(f"GRPOTrainer.train({', '.join(kwargs)}=...): gspo takes resume_from_checkpoint only")
        start = time.perf_counter()
        resume = self._resume(resume_from_checkpoint)
        if not resume:
            self._replace_previous_run()
        summary = self._gspo.train(resume=resume)
        self._trained = True
        self.summary = summary
        runtime = time.perf_counter() - start
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        train_loss = sum(losses) / len(losses) if losses else 0.0
        metrics = {"train_runtime": runtime, "train_steps_per_second": self.state.global_step / max(runtime, 1e-9),
                   "train_loss": train_loss}
        self._bridge.log(metrics)
        self._bridge.fire("on_train_end")
        return TrainOutput(self.state.global_step, train_loss, {**metrics, "epoch": self.state.epoch or 0.0})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write ``output_dir`` (default ``args.output_dir``) as a Hugging Face directory with the tokenizer:
        the full model (``AutoModelForCausalLM.from_pretrained`` loads it), or with LoRA the adapter only
        (``adapter_model.safetensors`` + ``adapter_config.json`` naming the base model), as TRL does;
        ``gspo export output_dir/gspo OUT`` writes the merged model."""
        from gspo.models.lora import is_peft

        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if is_peft(model) and not model.peft_config["default"].base_model_name_or_path:
            model.peft_config["default"].base_model_name_or_path = getattr(model, "name_or_path", None)
        use_cache = model.config.use_cache
        model.config.use_cache = True  # gspo turns the cache off for training forwards; a saved model generates
        try:
            model.save_pretrained(out)
        finally:
            model.config.use_cache = use_cache
        self.processing_class.save_pretrained(out)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy and mean reward of the current weights, ``eval_``-prefixed (needs an eval_dataset)."""
        if not self.has_eval:
            raise ConfigError("GRPOTrainer.evaluate(): no eval_dataset was given")
        metrics = {"eval_" + k.removeprefix("eval/"): v for k, v in self._gspo.evaluate().items()}
        self._bridge.fire("on_evaluate", metrics=metrics)
        return metrics

    @property
    def model(self):
        """The policy: after train() the trained one (PEFT-wrapped with LoRA); before, the model given."""
        if self._trained or self.loaded_model is None:
            return self._gspo.model
        return self.loaded_model

    @property
    def run_dir(self) -> Path:
        """gspo's run directory (metrics.jsonl, samples.jsonl, checkpoints): ``output_dir/gspo``."""
        return Path(self.args.output_dir) / RUN_SUBDIR

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def remove_callback(self, callback) -> None:
        self.callbacks = [c for c in self.callbacks if c is not callback and type(c) is not callback]

    def is_world_process_zero(self) -> bool:
        from gspo import distributed as dist

        return dist.is_main()

    # -- helpers -----------------------------------------------------------------------------------------
    def _new_state(self):
        from transformers.trainer_callback import TrainerState

        from gspo import distributed as dist

        total = self.plan.max_optimizer_steps
        state = TrainerState(max_steps=total, logging_steps=self.logging_every,
                             save_steps=math.ceil(_fraction_of(self.args.save_steps, total)),
                             eval_steps=math.ceil(_fraction_of(self.args.eval_steps or self.args.logging_steps, total)),
                             train_batch_size=self.args.per_device_train_batch_size,
                             num_train_epochs=math.ceil(self.plan.steps / max(self.steps_per_epoch, 1)))
        state.is_local_process_zero = state.is_world_process_zero = dist.is_main()
        return state

    def _replace_previous_run(self) -> None:
        """A script run again into the same output_dir trains afresh, as with TRL: the previous gspo run there
        (its metrics and checkpoints) goes, so that neither mixes with the new one."""
        from gspo import distributed as dist

        if dist.is_main() and (self.run_dir / "config.json").is_file():
            warnings.warn(f"replacing the previous run in {self.run_dir} (train(resume_from_checkpoint=True) would "
                          "continue it)", TRLCompatWarning, stacklevel=3)
            shutil.rmtree(self.run_dir)
        dist.barrier()

    def _resume(self, resume_from_checkpoint: bool | str | None) -> bool:
        if resume_from_checkpoint in (None, False):
            return False
        if resume_from_checkpoint is True or Path(resume_from_checkpoint).resolve() in (
                Path(self.args.output_dir).resolve(), self.run_dir.resolve()):
            return True
        raise ConfigError(f"GRPOTrainer.train(resume_from_checkpoint={resume_from_checkpoint!r}): gspo resumes the "
                          f"newest valid checkpoint of {self.run_dir}; pass True")


def _refuse(unsupported: dict, reward_processing_classes, optimizers, model) -> None:
    for name, value in unsupported.items():  # quantization_config, tools, rollout_func, environment_factory, ...
        if value is not None:
            raise ConfigError(f"GRPOTrainer({name}=...) has no gspo equivalent (docs/trl.md lists what is mapped)")
    if reward_processing_classes is not None:
        raise ConfigError("GRPOTrainer(reward_processing_classes=...): gspo's reward models use the tokenizer saved "
                          "in their directory; remove the argument")
    if tuple(optimizers) != (None, None):
        raise ConfigError("GRPOTrainer(optimizers=...): gspo builds AdamW and its schedule from the config "
                          "(learning_rate, lr_scheduler_type, warmup_steps, weight_decay)")
    if hasattr(model, "peft_config"):
        raise ConfigError("GRPOTrainer(model=<PeftModel>): pass the base model and peft_config=LoraConfig(...); gspo "
                          "adds the adapters itself")


def _records(dataset: Any, what: str) -> list[dict] | None:
    if dataset is None:
        return None
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        return dataset.to_list()
    if isinstance(dataset, (list, tuple)):
        return list(dataset)
    raise ConfigError(f"GRPOTrainer({what}={type(dataset).__name__}): gspo takes a datasets.Dataset or a list of "
                      "dicts (an IterableDataset or a dict of datasets is not supported)")


def _tokenizer(model: Any, processing_class: Any):
    """The tokenizer: the one given, else the one saved beside the model (TRL loads it the same way)."""
    from gspo.models.load import load_tokenizer, prepare_tokenizer, resolve_model_path

    if processing_class is not None:
        return prepare_tokenizer(processing_class, where="processing_class")
    if isinstance(model, (str, Path)):
        return load_tokenizer(resolve_model_path(str(model)))
    source = getattr(model, "name_or_path", "")
    if not source or not Path(source).is_dir():
        raise ConfigError("GRPOTrainer(model=<loaded model>) needs processing_class=<its tokenizer> (the model "
                          "does not name a local directory to load it from)")
    return load_tokenizer(Path(source))


def _model_type(model: Any) -> str | None:
    if not isinstance(model, (str, Path)):
        return getattr(getattr(model, "config", None), "model_type", None)
    import json

    from gspo.models.load import resolve_model_path

    return json.loads((resolve_model_path(str(model)) / "config.json").read_text()).get("model_type")


def _model_name(model: Any) -> str:
    name = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", "") or "model"
    return Path(name).name or "model"


def _cuda(args: GRPOConfig) -> bool:
    import torch

    return torch.cuda.is_available() and not args.use_cpu


def _fraction_of(steps: float, total: int) -> float:
    """transformers' convention: a value below 1 is a fraction of the run's optimizer steps."""
    return steps * total if 0 < steps < 1 else steps


def _check_prompt_lengths(rows: list[dict], tokenizer, limit: int | None) -> None:
    """``max_prompt_length``: TRL truncated prompts (until 0.28; now it asks you to filter); gspo refuses."""
    if limit is None:
        return
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise ConfigError(f"train_dataset row {i}: its prompt has {n} tokens, more than max_prompt_length={limit}. "
                              "gspo never truncates a prompt (TRL no longer does either, since 0.28); filter the "
                              "dataset first, e.g. dataset.filter(lambda r: len(tokenizer(r['prompt']).input_ids) "
                              f"<= {limit})")
