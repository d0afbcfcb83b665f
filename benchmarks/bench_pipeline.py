"""Pipelined sampling (``rollout.max_staleness``) on the embedded main job: step time vs the overlap bound.

Each variant is a whole ``gspo train`` run of the main job (the embedded tiny-arith model, 200 steps of 16
prompts x 8 responses, 4 minibatches) in its own process, with ``OMP_WAIT_POLICY=PASSIVE``; variants
interleave (the order rotates with the seed) so that load from other users of the machine hits all alike.

For the synchronous run (s=0) the perfect-overlap bound is computed from its own phases, step by step:
``sum_k max(sampling_k, rest_k)`` where sampling is the engine's prefill + decode time and rest is the
remainder of the step (scoring, old log-probabilities, the 4 optimizer steps, weight sync); its ratio to the
synchronous step time is what a perfect pipeline could reach. The pipelined runs report their measured step
time, the sampler's and the trainer's busy time and the trainer's wait. Held-out accuracy (sampled and
greedy, ``eval.size`` prompts) and the clip / ratio statistics under GSPO's 3e-4 / 4e-4 band are read from
each run's summary and metrics.

    PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_pipeline.py --seeds 0 1 2 --stale 0 1 \
        --extra-stale 2 --out benchmarks/results/bench_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# Per-step metrics averaged into the clip / ratio summary of a run (present for GSPO).
RATIO_KEYS = ("loss/clip_frac", "onpolicy/clip_frac", "logratio/seq_std", "ratio/outside_band_frac",
              "kl/old_new")


def run_variant(staleness: int, seed: int, steps: int, extra: list[str], tmp: Path) -> dict:
    run = tmp / f"s{staleness}-seed{seed}"
    argv = [sys.executable, "-m", "gspo", "train", f"seed={seed}", f"steps={steps}", f"run_dir={run}",
            f"rollout.max_staleness={staleness}", "log.progress=false", "log.tensorboard=false",
            "checkpoint.every=0", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"run s={staleness} seed={seed} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "time/step_s" in r]
    summary = json.loads((run / "summary.json").read_text())
    return {"staleness": staleness, "seed": seed, "wall_s": wall, **phases(steps_), "ratios": ratios(steps_),
            "accuracy_before": summary["before"]["eval/accuracy"], "accuracy_after": summary["after"]["eval/accuracy"],
            "greedy_after": summary["after"].get("eval/greedy_accuracy"), "load_after": os.getloadavg()[0]}


def phases(steps: list[dict]) -> dict:
    """Sums over the run's steps: step time, sampling, the rest, the per-step overlap bound, pipeline halves."""
    sampling = [r.get("sample/prefill_s", 0.0) + r.get("sample/decode_s", 0.0) for r in steps]
    step = [r["time/step_s"] for r in steps]
    out = {"steps": len(steps), "step_s": sum(step), "step_s_after_first": sum(step[1:]),
           "sampling_s": sum(sampling), "update_s": sum(r["time/update_s"] for r in steps)}
    if "pipeline/wait_s" not in steps[0]:
        rest = [t - s for t, s in zip(step, sampling)]
        out.update(rest_s=sum(rest), bound_s=sum(max(s, r) for s, r in zip(sampling, rest)),
                   bound_s_after_first=sum(max(s, r) for s, r in zip(sampling[1:], rest[1:])))
    else:
        out.update({key.split("/")[1]: sum(r[key] for r in steps) for key in
                    ("pipeline/sampler_busy_s", "pipeline/trainer_busy_s", "pipeline/wait_s")})
        out["wait_s_after_first"] = sum(r["pipeline/wait_s"] for r in steps[1:])
        out["staleness_last"] = steps[-1]["pipeline/staleness"]
    return out


def ratios(steps: list[dict]) -> dict:
    return {key: statistics.fmean(r[key] for r in steps) for key in RATIO_KEYS if key in steps[0]}


def summarise(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["staleness"], []).append(r)
    sync = {r["seed"]: r for r in by.get(0, [])}
    out = {}
    for s, rs in sorted(by.items()):
        row = {"seeds": [r["seed"] for r in rs], "step_s": [r["step_s"] for r in rs],
               "accuracy_after": [r["accuracy_after"] for r in rs], "greedy_after": [r["greedy_after"] for r in rs],
               "ratios": {k: statistics.fmean(r["ratios"][k] for r in rs) for k in rs[0]["ratios"]}}
        if s == 0:
            row["bound_over_sync"] = [r["bound_s"] / r["step_s"] for r in rs]
        else:
            paired = [(r, sync[r["seed"]]) for r in rs if r["seed"] in sync]
            row["step_over_sync"] = [r["step_s"] / b["step_s"] for r, b in paired]
            row["step_over_bound"] = [r["step_s"] / b["bound_s"] for r, b in paired]
            row["steady_step_over_steady_bound"] = [r["step_s_after_first"] / b["bound_s_after_first"]
                                                   for r, b in paired]
            row["wait_s"] = [r["wait_s"] for r in rs]
        out[f"s={s}"] = row
    return out


def profile_update(steps: int = 3, top: int = 15) -> dict:
    """Per-op self CPU time of the main job's update (its 4 optimizer steps), after ``steps`` warm-up steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer.from_config(load_config(None, ["log.progress=false", "log.tensorboard=false"]))
    for _ in range(steps):
        trainer.train_step()
    real = trainer.updater.update
    holder = {}

    def profiled(*a, **kw):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = real(*a, **kw)
        holder["prof"] = prof
        return out

    trainer.updater.update = profiled
    metrics = trainer.train_step()
    events = holder["prof"].key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"update_s": metrics["time/update_s"], "profiled_self_cpu_s": total,
            "ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / 1e6 / total,
                     "calls": e.count} for e in rows]}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stale", type=int, nargs="+", default=[0, 1], help="max_staleness values, every seed")
    parser.add_argument("--extra-stale", type=int, nargs="*", default=[2], help="values run for the first seed only")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value for every run")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_pipeline.json")
    parser.add_argument("--profile", action="store_true", help="only profile the update, per op")
    args = parser.parse_args()
    if args.profile:
        result = profile_update()
        args.out.write_text(json.dumps(result, indent=2))
        for op in result["ops"]:
            print(f"{op['op']:<40} {op['self_s'] * 1000:8.1f} ms  {op['share']:6.1%}  x{op['calls']}")
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for i, seed in enumerate(args.seeds):
            order = args.stale[i % len(args.stale):] + args.stale[: i % len(args.stale)]  # rotate
            if i == 0:
                order += args.extra_stale
            for s in order:
                record = run_variant(s, seed, args.steps, args.override, Path(tmp))
                runs.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "ratios"}), flush=True)
    result = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": __import__("torch").__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "override": args.override,
              "runs": runs, "summary": summarise(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
