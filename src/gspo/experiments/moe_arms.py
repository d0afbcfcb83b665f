"""One training run of the MoE stability study: an *arm* (algorithm + options) and a seed.

Arms (GSPO paper section 5.3 and 5.4):

- ``gspo``: GSPO, sequence clip 3e-4 / 4e-4, no Routing Replay;
- ``grpo``: GRPO with the paper's baseline clip 0.2 / 0.27, no Routing Replay;
- ``grpo_r2``: the same GRPO with Routing Replay R2 (experts of the training model's old-policy pass);
- ``gspo_bf16`` / ``grpo_bf16``: the precision claim (section 5.4): rollouts sampled from a bfloat16
  copy of the policy and the *sampler's* log-probabilities used as old log-probabilities
  (``loss.old_logprobs=rollout``) while training in float32.

Every arm of one seed sees the same prompts (the data order and sampling seeds depend only on the
seed) and the same compute (steps x prompts x group size x minibatches). The run goes through the
public :class:`~gspo.trainer.trainer.Trainer` API; the only addition is the updater's public
``on_logprobs`` hook, which hands each minibatch's log-probabilities to a :class:`LogRatioBins`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gspo.config import load_config
from gspo.experiments.logratio_bins import LogRatioBins
from gspo.trainer.trainer import Trainer

GRPO_PAPER_CLIP = ("loss.clip_low=0.2", "loss.clip_high=0.27")  # the GSPO paper's GRPO baseline (section 5.1)
BF16_ROLLOUT = ("rollout.engine_dtype=bfloat16", "loss.old_logprobs=rollout")  # section 5.4


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: tuple[str, ...]


ARMS = {
    "gspo": Arm("gspo", "GSPO", ("algorithm=gspo",)),
    "grpo": Arm("grpo", "GRPO", ("algorithm=grpo", *GRPO_PAPER_CLIP)),
    "grpo_r2": Arm("grpo_r2", "GRPO + Routing Replay (R2)", ("algorithm=grpo", *GRPO_PAPER_CLIP, "moe.routing_replay=r2")),
    "gspo_bf16": Arm("gspo_bf16", "GSPO, bf16 rollout log-probs", ("algorithm=gspo", *BF16_ROLLOUT)),
    "grpo_bf16": Arm("grpo_bf16", "GRPO, bf16 rollout log-probs", ("algorithm=grpo", *GRPO_PAPER_CLIP, *BF16_ROLLOUT)),
}
MAIN_ARMS = ("gspo", "grpo", "grpo_r2")
PRECISION_ARMS = ("gspo_bf16", "grpo_bf16")

# Step metrics kept per run (means over the step's minibatches unless named onpolicy/...).
STEP_KEYS = ("reward/mean", "reward/accuracy", "loss/clip_frac", "loss/seq_clip_frac", "onpolicy/clip_frac",
             "ratio/outside_band_frac", "moe/volatility", "logratio/token_std", "logratio/seq_std", "kl/old_new",
             "mismatch/token_std", "mismatch/seq_std", "mismatch/token_abs_mean", "response/length_mean",
             "optim/grad_norm", "time/step_s")
# Per-minibatch metrics kept from trainer.last_updates (index 0 is the on-policy minibatch).
MINIBATCH_KEYS = ("loss/clip_frac", "loss/seq_clip_frac", "ratio/outside_band_frac", "moe/volatility",
                  "logratio/token_std", "logratio/seq_std")


@dataclass(frozen=True)
class RunSettings:
    """What every arm shares: model, budget and batch shape."""

    model: str
    steps: int
    prompts_per_step: int = 16
    group_size: int = 8
    minibatches: int = 4
    lr: float = 1e-4
    eval_size: int = 200
    eval_every: int = 10  # held-out evaluation every N steps (and before and after)

    def overrides(self, seed: int) -> list[str]:
        return [f"model={self.model}", f"steps={self.steps}", f"seed={seed}",
                f"rollout.prompts_per_step={self.prompts_per_step}", f"rollout.group_size={self.group_size}",
                f"optim.minibatches={self.minibatches}", f"optim.lr={self.lr}", f"eval.size={self.eval_size}",
                "eval.samples=1",  # the study's budget (evaluated every eval_every steps); docs measured so
                "log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "log.samples=0"]


def _tap(bins: LogRatioBins):
    """An ``Updater.on_logprobs`` hook: hands each loss forward's (b, T) log-probabilities to ``bins``."""
    def on_logprobs(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
        bins.add(logprobs, old_logprobs, mask)

    return on_logprobs


def run_arm(arm: Arm, seed: int, settings: RunSettings, run_dir: Path, bins: LogRatioBins) -> dict:
    """Train one arm for ``settings.steps`` steps; returns its curves and per-minibatch metrics."""
    started, cpu = time.perf_counter(), time.process_time()
    config = load_config(None, [*settings.overrides(seed), *arm.overrides])
    trainer = Trainer.from_config(config, run_dir)
    trainer.save_resolved_config()
    trainer.updater.on_logprobs = _tap(bins)
    evals = [{"step": 0, **trainer.evaluate()}]
    steps, minibatches = [], []
    for step in range(1, settings.steps + 1):
        bins.start_step()
        metrics = trainer.train_step()
        if bins.calls == 0:
            raise RuntimeError("the log-ratio tap saw no loss forward: Updater.on_logprobs is no longer called")
        steps.append({"step": step, **{k: float(metrics[k]) for k in STEP_KEYS if k in metrics}})
        minibatches.append([{k: float(h[k]) for k in MINIBATCH_KEYS if k in h} for h in trainer.last_updates])
        if step % settings.eval_every == 0 or step == settings.steps:
            evals.append({"step": step, **trainer.evaluate()})
    trainer.logger.close()
    return {"arm": arm.name, "seed": seed, "steps": steps, "minibatches": minibatches, "evals": evals,
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}
