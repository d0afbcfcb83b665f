"""Time to accuracy: gspo (synchronous and pipelined) vs TRL's GRPOTrainer configured for GSPO.

The same warm-started model (the embedded tiny-arith Qwen3 and its character tokenizer), the same JSONL
training data and held-out JSONL (the arithmetic task's rows, written once), the same reward (exact
answer, ``gspo.tasks.arithmetic.exact_answer_reward``), the same workload per rollout batch (16 prompts x
8 responses, 8 new tokens, 4 minibatches, lr 1e-4, GSPO clip 3e-4 / 4e-4, beta 0) and the same wall-clock
budget of training. Every variant runs in its own fresh process, one after the other, with
``OMP_WAIT_POLICY=PASSIVE``:

- ``gspo-sync``: gspo's main-job defaults (one thread, ``rollout.max_staleness=0``);
- ``gspo-pipelined``: the same with ``rollout.max_staleness=1`` (a sampler process on the second core);
- ``trl``: ``GRPOTrainer`` with ``importance_sampling_level="sequence"``, ``loss_type="grpo"``, epsilon
  3e-4 / 4e-4, ``steps_per_generation=4``, ``num_generations=8``, batch 32, float32, one thread (its best
  setting on this 2-core CPU: 637 vs 517 optimizer steps in 120 s, issue 14).

The clock counts training only (from the first rollout batch; model loading, gspo's evaluation before
training and snapshot copies are excluded). A snapshot of the weights is kept every ``--every`` seconds of
training and at the end; after all runs, one evaluator scores every snapshot of every variant the same way:
gspo's held-out evaluation (``eval.size`` prompts x ``eval.samples`` responses sampled at temperature 1, a
fixed seed), so the curves differ only by the training. Reported: accuracy vs time, each variant's final
accuracy, and the time each gspo variant needs to reach TRL's final accuracy (linear interpolation
between snapshots) with its ratio to TRL's own time to get there.

    PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_time_to_accuracy.py --budget 120
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS, GROUP, NEW_TOKENS, MINIBATCHES, LR, SEED = 16, 8, 8, 4, 1e-4, 0
REWARD = "gspo.tasks.arithmetic:exact_answer_reward"
VARIANTS = {"gspo-sync": ["rollout.max_staleness=0"], "gspo-pipelined": ["rollout.max_staleness=1"], "trl": None}


def write_data(directory: Path, batches: int, eval_size: int) -> tuple[Path, Path]:
    from gspo.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(seed=SEED)
    train, held = directory / "train.jsonl", directory / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in task.train_rows(PROMPTS * batches)))
    held.write_text("".join(json.dumps(r) + "\n" for r in task.eval_rows(eval_size)))
    return train, held


def gspo_overrides(args) -> list[str]:
    return ["model=tiny-arith", f"data.path={args.train}", f"data.eval_path={args.heldout}", f"reward.functions={REWARD}",
            f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
            f"optim.minibatches={MINIBATCHES}", f"optim.lr={LR}", f"seed={SEED}", "steps=100000", "device=cpu",
            "log.progress=false", "log.tensorboard=false", f"eval.size={args.eval_size}", f"eval.samples={args.samples}"]


class Snapshots:
    """Weights copies every ``every`` seconds of training time (the copying itself is not counted)."""

    def __init__(self, model, every: float) -> None:
        self.model, self.every, self.taken = model, every, []
        self.start = time.perf_counter()
        self.paused = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def maybe(self, batches: int, force: bool = False) -> None:
        t = self.elapsed()
        if self.taken and self.taken[-1]["batches"] == batches:
            return
        if force or t >= self.every * len(self.taken):
            pause = time.perf_counter()
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.taken.append({"t": t, "batches": batches, "state": state})
            self.paused += time.perf_counter() - pause


def run_gspo(args) -> list[dict]:
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, [*gspo_overrides(args), *VARIANTS[args.variant]]))
    try:
        if trainer.pipeline is not None:  # the sampler process has started (TRL's setup is not timed either)
            trainer.pipeline.engine.info  # noqa: B018
        snaps = Snapshots(trainer.model, args.every)
        snaps.maybe(0, force=True)
        batches = 0
        while snaps.elapsed() < args.budget:
            trainer.train_step()
            batches += 1
            snaps.maybe(batches)
        snaps.maybe(batches, force=True)
        return snaps.taken
    finally:
        trainer.close()


def run_trl(args) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gspo.models.load import resolve_model_path
    from gspo.tasks.arithmetic import exact_answer_reward

    torch.set_num_threads(1)

    def exact_answer(prompts, completions, answer, **_):
        return [exact_answer_reward(p, c, answer=a) for p, c, a in zip(prompts, completions, answer)]

    path = resolve_model_path("tiny-arith")
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-tta-"), report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=10 ** 9, use_cpu=True, bf16=False, seed=SEED,
        per_device_train_batch_size=PROMPTS * GROUP // MINIBATCHES, gradient_accumulation_steps=1,
        steps_per_generation=MINIBATCHES, num_generations=GROUP, num_iterations=1, max_completion_length=NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, importance_sampling_level="sequence", loss_type="grpo",
        epsilon=3e-4, epsilon_high=4e-4, beta=0.0, scale_rewards="group", learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=MINIBATCHES * (len(rows) // PROMPTS), shuffle_dataset=False, use_vllm=False,
        gradient_checkpointing=False,  # faster on this model (benchmarks/README.md: TRL without checkpointing)
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_answer], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(path))
    holder = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            holder["snaps"] = Snapshots(model, args.every)
            holder["snaps"].maybe(0, force=True)

        def on_step_end(self, _args, state, control, **_):
            if state.global_step % MINIBATCHES:
                return
            snaps = holder["snaps"]
            snaps.maybe(state.global_step // MINIBATCHES)
            if snaps.elapsed() >= args.budget:
                snaps.maybe(state.global_step // MINIBATCHES, force=True)
                control.should_training_stop = True

    trainer.add_callback(Clock())
    trainer.train()
    return holder["snaps"].taken


def evaluate(args, snapshots: list[dict]) -> list[dict]:
    """gspo's held-out evaluation of every snapshot: the same evaluator, seed and prompts for every variant."""
    from gspo.config import load_config
    from gspo.trainer.build import build_evaluation
    from gspo.trainer.trainer import evaluate_heldout

    config = load_config(None, [*gspo_overrides(args), "eval.greedy=false"])
    parts = build_evaluation(config)
    out = []
    for snap in snapshots:
        parts.model.load_state_dict(snap["state"])
        accuracy = evaluate_heldout(parts.evaluator, parts.task.eval_rows, config)["eval/accuracy"]
        out.append({"t": snap["t"], "batches": snap["batches"], "accuracy": accuracy})
    return out


def time_to(curve: list[dict], target: float) -> float | None:
    """First time the curve reaches ``target`` (linear interpolation between snapshots)."""
    for a, b in zip(curve, curve[1:]):
        if b["accuracy"] >= target:
            if a["accuracy"] >= target:
                return a["t"]
            return a["t"] + (b["t"] - a["t"]) * (target - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
    return None


def worker(args) -> None:
    torch.set_num_threads(1)
    snaps = run_trl(args) if args.variant == "trl" else run_gspo(args)
    curve = evaluate(args, snaps)
    Path(args.result).write_text(json.dumps(curve))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training per variant")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between weight snapshots")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_time_to_accuracy.json")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--heldout", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return worker(args)
    curves, loads = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        train, held = write_data(Path(tmp), batches=2000, eval_size=args.eval_size)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
        for name in args.variants:
            result = Path(tmp) / f"{name}.json"
            subprocess.run([sys.executable, __file__, "--variant", name, "--train", str(train), "--heldout", str(held),
                            "--result", str(result), "--budget", str(args.budget), "--every", str(args.every),
                            "--eval-size", str(args.eval_size), "--samples", str(args.samples)], env=env, check=True)
            curves[name], loads[name] = json.loads(result.read_text()), os.getloadavg()[0]
            print(name, json.dumps(curves[name]), flush=True)
    summary = {name: {"final_accuracy": c[-1]["accuracy"], "batches": c[-1]["batches"], "seconds": c[-1]["t"]}
               for name, c in curves.items()}
    if "trl" in curves:
        target = curves["trl"][-1]["accuracy"]
        trl_time = time_to(curves["trl"], target)
        for name, c in curves.items():
            t = time_to(c, target)
            summary[name]["time_to_trl_final_s"] = t
            summary[name]["speedup_vs_trl"] = (trl_time / t) if t and trl_time else None
    result = {"budget_s": args.budget, "eval": {"size": args.eval_size, "samples": args.samples},
              "cores": len(os.sched_getaffinity(0)), "load_after": loads, "date": time.strftime("%Y-%m-%d %H:%M"),
              "curves": curves, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
