"""``gspo experiment algorithms``: the objectives side by side on gspo's own loop.

Every arm sees the same model, prompts, seeds and compute (steps x prompts x group size x minibatches);
only ``algorithm`` (with its paper defaults, docs/objectives.md) changes. A second part samples with a
bfloat16 copy of the policy (a real train/inference mismatch) and trains with and without each rollout
correction, so the effect of a correction is measured against the mismatch it exists for.

Reported (OUT/report.md, curves.png, results.json): held-out accuracy vs steps and vs wall time (mean
over seeds), final accuracy with its spread across seeds, clip / mask fractions, sequence log-ratio
spread, time per step, and one sentence per claim saying plainly whether it reproduced here.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from gspo.errors import ConfigError

HELP = """usage: gspo experiment algorithms [key=value ...]

The objectives on the same model, prompts, seeds and compute (docs/objectives.md), then a bfloat16
sampler with and without each rollout correction. Writes OUT/report.md, OUT/curves.png, results.json
and one run directory per (arm, seed). Default: about 15 CPU-minutes (8-10 minutes on 2 idle cores).

  algorithms=gspo,gspo_token,grpo,dapo,cispo,sapo,gmpo   objectives to compare (any registered ones)
  seeds=2          seeds per arm
  steps=60         rollout batches per run (16 prompts x 8 responses, 4 minibatches each)
  corrections=none,tis,mis,geo_mis   rollout corrections of the bf16-sampler part (empty: skip it)
  correction_algorithms=gspo,grpo    objectives of the bf16-sampler part
  model=tiny-arith the policy (an embedded name, e.g. tiny-moe, or a local Hugging Face directory)
  workers=2        parallel processes (each single-threaded)
  out=DIR          output directory (default runs/algorithms-<time>)
  quick=true       a smoke setting (2 algorithms, 1 seed, 2 steps, tiny batches): under a minute"""

# Per-step metrics kept (means over the step's minibatches).
STEP_KEYS = ("reward/mean", "loss/clip_frac", "logratio/seq_std", "logratio/token_std", "mismatch/seq_std",
             "time/step_s")


@dataclass(frozen=True)
class Options:
    algorithms: tuple[str, ...] = ("gspo", "gspo_token", "grpo", "dapo", "cispo", "sapo", "gmpo")
    seeds: int = 2
    steps: int = 60
    corrections: tuple[str, ...] = ("none", "tis", "mis", "geo_mis")
    correction_algorithms: tuple[str, ...] = ("gspo", "grpo")
    model: str = "tiny-arith"
    workers: int = 2
    out: str = ""
    quick: bool = False
    prompts_per_step: int = 16
    group_size: int = 8
    eval_size: int = 200
    eval_points: int = 4  # held-out evaluations during a run (plus before and after)


QUICK = dict(algorithms=("gspo", "grpo"), seeds=1, steps=2, corrections=("none", "tis"),
             correction_algorithms=("gspo",), prompts_per_step=4, group_size=4, eval_size=8, eval_points=1)


@dataclass(frozen=True)
class Arm:
    name: str
    algorithm: str
    correction: str | None = None  # None: the float32 sampler; else a bf16 sampler with this correction

    def overrides(self) -> list[str]:
        extra = [f"algorithm={self.algorithm}", "loss.dynamic_sampling=false"]  # same compute for every arm
        if self.correction is not None:
            extra += ["rollout.engine_dtype=bfloat16", f"correction.mode={self.correction}"]
        return extra


def parse_options(args: list[str]) -> Options:
    from gspo.algorithms.catalogue import CORRECTION_MODES, SPECS

    options, given = Options(), {}
    fields = {f for f in Options.__dataclass_fields__ if f not in ("prompts_per_step", "group_size", "eval_size",
                                                                    "eval_points")}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in fields:
            from gspo.suggest import did_you_mean

            raise ConfigError(f"unknown option '{arg}' for gspo experiment algorithms.{did_you_mean(key, fields)} "
                              "See 'gspo experiment algorithms --help'")
        given[key] = value
    if given.get("quick", "false").lower() in ("1", "true", "yes", "on"):
        options = replace(options, **QUICK, quick=True)
    for key, value in given.items():
        if key in ("algorithms", "corrections", "correction_algorithms"):
            items = tuple(v.strip() for v in value.split(",") if v.strip())
            allowed = CORRECTION_MODES if key == "corrections" else tuple(SPECS)
            bad = [v for v in items if v not in allowed]
            if bad:
                raise ConfigError(f"{key}: {', '.join(bad)} not one of {', '.join(allowed)}")
            options = replace(options, **{key: items})
        elif key in ("seeds", "steps", "workers"):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key}={value!r} must be a whole number >= 1")
            options = replace(options, **{key: int(value)})
        elif key in ("model", "out"):
            options = replace(options, **{key: value})
    return options


def arms(options: Options) -> list[Arm]:
    out = [Arm(a, a) for a in options.algorithms]
    for algorithm in options.correction_algorithms if options.corrections else ():
        out += [Arm(f"{algorithm}+bf16/{c}", algorithm, c) for c in options.corrections]
    return out


def run_arm(arm: Arm, seed: int, options: Options, run_dir: str) -> dict:
    """One training run; returns its per-step metrics and held-out evaluations with wall times."""
    import torch

    torch.set_num_threads(1)
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    every = max(1, options.steps // (options.eval_points + 1))
    config = load_config(None, [
        f"model={options.model}", f"steps={options.steps}", f"seed={seed}",
        f"rollout.prompts_per_step={options.prompts_per_step}", f"rollout.group_size={options.group_size}",
        f"eval.size={options.eval_size}", "eval.samples=2", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every=0", "log.samples=0", f"run_dir={run_dir}", *arm.overrides()])
    trainer = Trainer.from_config(config, Path(run_dir))
    trainer.save_resolved_config()
    started = time.perf_counter()
    train_seconds = 0.0
    evals = [{"step": 0, "seconds": 0.0, **trainer.evaluate()}]
    steps = []
    for step in range(1, options.steps + 1):
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        train_seconds += time.perf_counter() - t0
        row = {"step": step, **{k: float(metrics[k]) for k in STEP_KEYS if k in metrics}}
        row.update({k: float(v) for k, v in metrics.items() if k.startswith("correction/")})
        steps.append(row)
        if step % every == 0 or step == options.steps:
            evals.append({"step": step, "seconds": train_seconds, **trainer.evaluate()})
    trainer.logger.close()
    return {"arm": arm.name, "algorithm": arm.algorithm, "correction": arm.correction, "seed": seed,
            "steps": steps, "evals": evals, "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - started}


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        from gspo.cli_args import fit

        print(fit(HELP))
        return 0
    options = parse_options(args)
    out = Path(options.out or f"runs/algorithms-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for arm in arms(options) for seed in range(options.seeds)]
    print(f"gspo experiment algorithms: {len(jobs)} runs ({len(arms(options))} arms x {options.seeds} seeds, "
          f"{options.steps} steps each) on {options.model} -> {out}", flush=True)
    results = []
    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_arm, arm, seed, options, str(out / "runs" / f"{arm.name.replace('/', '-')}-s{seed}"))
                   for arm, seed in jobs]
        for future in futures:
            result = future.result()
            results.append(result)
            final = result["evals"][-1]["eval/accuracy"]
            print(f"  {result['arm']} seed {result['seed']}: held-out {final:.1%} after {options.steps} steps "
                  f"({result['train_seconds']:.0f} s)", flush=True)
    summary = summarise(results, options)
    (out / "results.json").write_text(json.dumps({"options": options.__dict__, "summary": summary,
                                                  "runs": results}, indent=1, default=list))
    plot_curves(results, out / "curves.png")
    (out / "report.md").write_text(report(summary, options, time.perf_counter() - started))
    print(f"report: {out / 'report.md'}")
    return 0


def summarise(results: list[dict], options: Options) -> dict[str, dict]:
    """Per arm: final accuracy (mean, min, max over seeds), lift, clip fraction, ratio spread, s/step."""
    out = {}
    for arm in arms(options):
        runs = [r for r in results if r["arm"] == arm.name]
        finals = [r["evals"][-1]["eval/accuracy"] for r in runs]
        lifts = [r["evals"][-1]["eval/accuracy"] - r["evals"][0]["eval/accuracy"] for r in runs]

        def mean_step(key):
            values = [s[key] for r in runs for s in r["steps"] if key in s]
            return statistics.fmean(values) if values else None

        corrections = sorted({k for r in runs for s in r["steps"] for k in s if k.startswith("correction/")})
        out[arm.name] = {
            "algorithm": arm.algorithm, "correction": arm.correction, "seeds": len(runs),
            "final_accuracy": statistics.fmean(finals), "final_min": min(finals), "final_max": max(finals),
            "lift": statistics.fmean(lifts), "clip_frac": mean_step("loss/clip_frac"),
            "seq_logratio_std": mean_step("logratio/seq_std"), "mismatch_seq_std": mean_step("mismatch/seq_std"),
            "seconds_per_step": statistics.fmean(r["train_seconds"] / len(r["steps"]) for r in runs),
            **{k: mean_step(k) for k in corrections},
        }
    return out


def claims(summary: dict[str, dict]) -> list[str]:
    """What the papers claim that this run can check, each with a plain verdict."""
    lines = []
    gspo, grpo = summary.get("gspo"), summary.get("grpo")
    if gspo and grpo and gspo["clip_frac"] is not None and grpo["clip_frac"]:
        ratio = gspo["clip_frac"] / grpo["clip_frac"]
        verdict = "reproduced" if ratio > 10 else "not reproduced"
        lines.append(f"GSPO clips far more tokens than GRPO (paper: about 100x, 0.15 vs 0.0013): "
                     f"{gspo['clip_frac']:.3f} vs {grpo['clip_frac']:.4f}, {ratio:.0f}x - {verdict}.")
    if gspo and grpo and gspo["seeds"] < 2:
        lines.append("GSPO vs GRPO accuracy: one seed per arm, no spread to judge a difference by (use seeds=3).")
    elif gspo and grpo:
        overlap = gspo["final_min"] <= grpo["final_max"] and grpo["final_min"] <= gspo["final_max"]
        better = gspo["final_accuracy"] > grpo["final_accuracy"]
        verdict = ("within the spread across seeds: not distinguishable at this scale" if overlap else
                   "reproduced" if better else "not reproduced (GRPO ahead)")
        lines.append(f"GSPO learns at least as well as GRPO at equal compute (paper: better): "
                     f"{gspo['final_accuracy']:.1%} vs {grpo['final_accuracy']:.1%} - {verdict}.")
    for name, row in summary.items():
        if row["correction"] not in (None, "none"):
            base = summary.get(f"{row['algorithm']}+bf16/none")
            if base:
                delta = row["final_accuracy"] - base["final_accuracy"]
                lines.append(f"{row['algorithm']} with a bf16 sampler, {row['correction']} vs no correction: "
                             f"{delta * 100:+.1f} points held-out"
                             + (" (within the seeds' spread)" if abs(delta) <= max(
                                 row["final_max"] - row["final_min"], base["final_max"] - base["final_min"]) else ""))
    return lines


def report(summary: dict[str, dict], options: Options, seconds: float) -> str:
    from gspo.experiments.machine import describe_machine

    head = ["| arm | seeds | held-out accuracy (min..max) | lift | clip frac | seq log-ratio std | s/step |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [f"| {name} | {r['seeds']} | {r['final_accuracy']:.1%} ({r['final_min']:.1%}..{r['final_max']:.1%}) | "
            f"{r['lift'] * 100:+.1f} | {_num(r['clip_frac'])} | {_num(r['seq_logratio_std'])} | "
            f"{r['seconds_per_step']:.2f} |" for name, r in summary.items()]
    corrected = {name: r for name, r in summary.items() if r["correction"] is not None}
    fixes = ["| bf16-sampler arm | sampler/trainer seq log-ratio std | tokens masked | sequences masked | "
             "tokens truncated | weight std |", "|---|---:|---:|---:|---:|---:|"]
    fixes += [f"| {name} | {_num(r['mismatch_seq_std'])} | {_num(r.get('correction/masked_frac'))} | "
              f"{_num(r.get('correction/seq_masked_frac'))} | {_num(r.get('correction/truncated_frac'))} | "
              f"{_num(r.get('correction/weight_std'))} |" for name, r in corrected.items()]
    return "\n".join([
        "# Objectives side by side", "",
        f"{options.model}, {options.steps} steps of {options.prompts_per_step} prompts x {options.group_size} "
        f"responses, 4 minibatches, {options.seeds} seed(s) per arm, held-out {options.eval_size} prompts x 2 "
        f"samples; {seconds / 60:.1f} minutes on {describe_machine()}.", "",
        *head, *rows, "", *(["## The bf16 sampler and the rollout corrections", "", *fixes, ""] if corrected else []),
        "s/step is wall time on a shared machine: compare arms within one report only.", "",
        "## What reproduced", "", *[f"- {line}" for line in claims(summary)], "",
        "Curves: curves.png (held-out accuracy vs steps and vs training seconds, mean over seeds).", ""])


def _num(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == name]
        points = list(zip(*[[(e["step"], e["seconds"], e["eval/accuracy"]) for e in r["evals"]] for r in runs]))
        steps = [p[0][0] for p in points]
        seconds = [statistics.fmean(q[1] for q in p) for p in points]
        accuracy = [statistics.fmean(q[2] for q in p) for p in points]
        style = "--" if "+bf16" in name else "-"
        by_step.plot(steps, accuracy, style, marker="o", ms=3, label=name)
        by_time.plot(seconds, accuracy, style, marker="o", ms=3, label=name)
    by_step.set(xlabel="step", ylabel="held-out accuracy (sampled)", title="accuracy vs steps")
    by_time.set(xlabel="training seconds", title="accuracy vs wall time")
    by_time.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
