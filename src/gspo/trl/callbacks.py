"""transformers ``TrainerCallback``s driven by gspo's run loop, with a real ``TrainerState`` / ``TrainerControl``.

gspo's loop calls its own protocol (``on_begin``, ``on_step``, ``on_eval``, ``on_save``; gspo.trainer.run);
:class:`CallbackBridge` turns those into the transformers events, with ``(args, state, control, **kwargs)``
as transformers' ``CallbackHandler`` passes them (``model``, ``processing_class``, ``optimizer``,
``lr_scheduler``; ``logs`` for ``on_log``, ``metrics`` for ``on_evaluate``):

- ``on_train_begin`` before the first step, ``on_train_end`` after the last (from ``GRPOTrainer.train``);
- ``on_step_end`` once per gspo step (one rollout batch), with ``state.global_step`` advanced by the
  ``optimizer steps`` that rollout batch took (TRL's unit: ``steps_per_generation / gradient_accumulation_steps
  x num_iterations``, 1 with TRL's defaults); ``on_step_begin`` and the sub-step events are not called;
- ``on_log`` when ``global_step`` reaches a multiple of ``logging_steps`` (and after the first step with
  ``logging_first_step``): TRL's metric names (``loss``, ``reward``, ``rewards/<name>/mean``, ...) averaged
  over the steps since the last log, plus gspo's own keys; appended to ``state.log_history`` with ``step``;
- ``on_evaluate`` for each held-out evaluation (with an ``eval_dataset``), ``eval_``-prefixed metrics;
- ``on_save`` after each checkpoint gspo writes (``output_dir/gspo/checkpoints``).

``control.should_training_stop`` ends training after the current step (evaluated and saved as a normal
end); the other ``control`` flags are reset after each event and otherwise ignored.
"""

from __future__ import annotations

from typing import Any

# gspo metric -> TRL's name for it (trl/trainer/grpo_trainer.py logs these)
TRL_NAMES = {"optim/grad_norm": "grad_norm", "optim/lr": "learning_rate", "reward/mean": "reward",
             "reward/std": "reward_std", "reward/zero_std_frac": "frac_reward_zero_std",
             "response/length_mean": "completions/mean_length", "response/length_max": "completions/max_length",
             "response/truncated_frac": "completions/clipped_ratio", "kl/ref": "kl",
             "loss/clip_frac": "clip_ratio/region_mean", "loss/clip_frac_low": "clip_ratio/low_mean",
             "loss/clip_frac_high": "clip_ratio/high_mean"}
BATCH_REWARD_KEYS = ("mean", "std", "accuracy", "zero_std_frac", "overlong_penalty")  # reward/<key> not a function
GSPO_OWN = ("eval/", "time/", "throughput/", "sample/")  # not averaged into TRL's logs (timings, evaluations)


class CallbackBridge:
    """gspo's callback protocol in, transformers' callback events out (module docstring)."""

    def __init__(self, owner) -> None:
        from transformers.trainer_callback import TrainerControl

        self.owner = owner  # the GRPOTrainer: args, state, callbacks, reward logs
        self.control = TrainerControl()
        self.window: list[dict[str, float]] = []
        self.tokens = 0
        self.runner = None

    # -- gspo's protocol ---------------------------------------------------------------------------------
    def on_begin(self, runner) -> None:
        self.runner = runner
        self.fire("on_train_begin")

    def on_step(self, runner, step: int, metrics: dict) -> bool:
        state, plan = self.owner.state, self.owner.plan
        before = state.global_step
        state.global_step = step * plan.updates_per_step
        if self.owner.steps_per_epoch:
            state.epoch = step / self.owner.steps_per_epoch
        self.tokens += int(metrics.get("tokens/trained", 0))
        state.num_input_tokens_seen = self.tokens
        self.window.append(metrics)
        self.fire("on_step_end")
        every = self.owner.logging_every
        if state.global_step // every > before // every or (step == 1 and self.owner.args.logging_first_step):
            self.log(self.trl_logs())
        return bool(self.control.should_training_stop)

    def on_eval(self, runner, step: int, metrics: dict) -> None:
        self.runner = runner
        if not self.owner.has_eval:
            return
        out = {"eval_" + key.removeprefix("eval/"): value for key, value in metrics.items()}
        out["epoch"] = self.owner.state.epoch or 0.0
        self.owner.state.log_history.append({**out, "step": self.owner.state.global_step})
        self.fire("on_evaluate", metrics=out)

    def on_save(self, runner, step: int, path) -> None:
        self.fire("on_save")

    # -- transformers' side ------------------------------------------------------------------------------
    def log(self, logs: dict[str, float]) -> None:
        """Append to ``state.log_history`` and call ``on_log`` (as ``transformers.Trainer.log``)."""
        state = self.owner.state
        logs = {**logs, "epoch": state.epoch or 0.0}
        state.log_history.append({**logs, "step": state.global_step})
        self.fire("on_log", logs=logs)

    def trl_logs(self) -> dict[str, float]:
        """The steps since the last log, averaged, under TRL's names (and gspo's own, namespaced with '/')."""
        keys = {k for m in self.window for k in m if not k.startswith(GSPO_OWN)}
        mean = {k: sum(m.get(k, 0.0) for m in self.window) / len(self.window) for k in sorted(keys)}
        self.window = []
        out = {"loss": mean.get("loss/policy", 0.0) + mean.get("loss/kl", 0.0), "num_tokens": float(self.tokens)}
        out.update({TRL_NAMES[k]: v for k, v in mean.items() if k in TRL_NAMES})
        for key, value in mean.items():  # reward/<function name>: one per reward function
            name = key.removeprefix("reward/")
            if key.startswith("reward/") and "/" not in name and name not in BATCH_REWARD_KEYS:
                out[f"rewards/{name}/mean"] = value
        out.update(self.owner.reward_logs.take_metrics())  # log_metric() from the reward functions
        out.update({k: v for k, v in mean.items() if k not in TRL_NAMES})
        return out

    def fire(self, event: str, **kwargs: Any) -> None:
        """Call ``event`` on every callback, as transformers' ``CallbackHandler.call_event`` does."""
        runner = self.runner
        common = {"model": runner.model if runner else self.owner.loaded_model,
                  "processing_class": self.owner.processing_class,
                  "optimizer": runner.parts.optimizer if runner else None,
                  "lr_scheduler": runner.parts.scheduler if runner else None}
        for callback in self.owner.callbacks:
            method = getattr(callback, event, None)
            result = method(self.owner.args, self.owner.state, self.control, **common, **kwargs) if method else None
            if result is not None:
                self.control = result
        stop = self.control.should_training_stop
        self.control.should_log = self.control.should_save = self.control.should_evaluate = False
        self.control.should_training_stop = stop
