"""``gspo experiment moe-stability``: GSPO vs GRPO (with and without Routing Replay) on a tiny MoE.

What the GSPO paper reports about Mixture-of-Experts RL (sections 5.3, 5.4 and the clipping figure),
measured on the embedded tiny Qwen3-MoE (``tiny-moe``) at equal data, seeds and compute:

- training reward and held-out accuracy of GSPO, GRPO, and GRPO with Routing Replay R2
  (:mod:`gspo.experiments.moe_arms`), mean and min/max band over seeds;
- the share of clipped tokens per algorithm and the GSPO / GRPO ratio (paper: about 0.15 vs 0.0013);
- expert volatility after one update at several depths (:mod:`gspo.experiments.volatility_depth`);
- the spread of token vs sequence log-ratios against response length (off-policy minibatches);
- the precision claim: old log-probabilities from a bfloat16 sampler, training in float32.

Options are ``key=value`` (see :data:`HELP`). Runs are independent single-threaded processes, so
``workers=2`` uses both cores of a 2-core machine without changing any number.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from gspo.errors import ConfigError

HELP = """usage: gspo experiment moe-stability [key=value ...]

GSPO vs GRPO vs GRPO + Routing Replay (R2) on the embedded tiny MoE, plus expert volatility by depth
and the bf16-rollout precision check (GSPO paper, sections 5.3-5.4). Writes OUT/report.md, PNG plots,
results.json and one run directory per (arm, seed). About 12 CPU-minutes of jobs: ~7 minutes on an
idle 2-core machine, 14-20 minutes on a shared one.

  seeds=3          seeds per arm (and per depth in the volatility probe)
  steps=50         rollout batches per run (16 prompts x 8 responses, 4 minibatches each)
  depths=1,2,4,8   depths of the one-update volatility probe
  lr=1e-4          RL learning rate (AdamW), also the probe's
  precision=true   also run the bf16-rollout arms (GSPO and GRPO with loss.old_logprobs=rollout)
  workers=2        parallel processes (each single-threaded)
  model=tiny-moe   the MoE policy (embedded name or a local Hugging Face directory)
  out=DIR          output directory (default runs/moe-stability-<time>)
  quick=true       a smoke setting (2 seeds, 2 steps, tiny batches, 1-2 layer probe): about a minute"""


@dataclass(frozen=True)
class StudyOptions:
    seeds: int = 3
    steps: int = 50
    depths: tuple[int, ...] = (1, 2, 4, 8)
    lr: float = 1e-4
    precision: bool = True
    workers: int = 2
    model: str = "tiny-moe"
    out: str = ""
    quick: bool = False
    # not on the command line: batch shape and evaluation (quick shrinks them)
    prompts_per_step: int = 16
    group_size: int = 8
    eval_size: int = 200
    eval_every: int = 10
    probe_sft_steps: int = 60
    probe_prompts: int = 64  # x group_size responses: ~2,000 response tokens, so 0.1% is ~2 expert flips


QUICK = dict(seeds=2, steps=2, prompts_per_step=4, group_size=4, eval_size=16, eval_every=1, probe_sft_steps=2,
             probe_prompts=4, depths=(1, 2))


def parse_options(args: list[str]) -> StudyOptions:
    """``key=value`` arguments -> :class:`StudyOptions`; quick=true shrinks what was not set."""
    parsers = {"seeds": int, "steps": int, "depths": _int_tuple, "lr": float, "precision": _bool,
               "workers": int, "model": str, "out": str, "quick": _bool}
    given = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in parsers:
            raise ConfigError(f"gspo experiment moe-stability takes {', '.join(k + '=...' for k in parsers)}; "
                              f"got '{arg}' (see --help)")
        try:
            given[key] = parsers[key](value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a valid {parsers[key].__name__.strip('_')}") from None
    options = StudyOptions(**given)
    if options.quick:
        options = replace(options, **{k: v for k, v in QUICK.items() if k not in given})
    if options.seeds < 1 or options.steps < 1 or options.workers < 1 or not options.depths:
        raise ConfigError("seeds, steps and workers must be >= 1 and depths must list at least one depth")
    return options


def run_moe_stability(options: StudyOptions, log=print) -> Path:
    """Run every arm and seed and the depth probe, then write the report; returns the output directory."""
    from gspo.experiments.moe_arms import MAIN_ARMS, PRECISION_ARMS, RunSettings
    from gspo.experiments.moe_plots import write_plots
    from gspo.experiments.moe_report import write_report
    from gspo.experiments.moe_summary import summarise
    from gspo.experiments.volatility_depth import ProbeSettings
    from gspo.models.load import resolve_model_path

    started = time.perf_counter()
    out = Path(options.out or f"runs/moe-stability-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model_path(options.model))
    settings = RunSettings(model=model, steps=options.steps, prompts_per_step=options.prompts_per_step,
                           group_size=options.group_size, lr=options.lr, eval_size=options.eval_size,
                           eval_every=options.eval_every)
    probe = ProbeSettings(depths=options.depths, seeds=tuple(range(options.seeds)), sft_steps=options.probe_sft_steps,
                          prompts=options.probe_prompts, group_size=options.group_size, lrs=(options.lr, 10 * options.lr))
    arms = MAIN_ARMS + (PRECISION_ARMS if options.precision else ())
    jobs = [("run", (arm, seed, settings, out / "runs" / f"{arm}-seed{seed}")) for arm in arms
            for seed in range(options.seeds)]
    jobs += [("probe", (depth, seed, probe)) for depth in options.depths for seed in range(options.seeds)]
    jobs.append(("usage", (model,)))
    log(f"moe-stability: {len(jobs)} jobs on {options.workers} worker(s) -> {out}")
    load_before = os.getloadavg()[0]
    results = _run_jobs(jobs, options.workers, log)
    runs = [r for kind, r in results if kind == "run"]
    probes = [r for kind, r in results if kind == "probe"]
    usage = next(r for kind, r in results if kind == "usage")
    summary = summarise(runs, probes, options=options, model=model)
    summary["expert_shares"] = usage["shares"]
    summary["seconds"] = time.perf_counter() - started
    summary["cpu_seconds"] = sum(r["cpu_seconds"] for r in runs + probes + [usage])  # job processes only
    summary["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute load at start and end (other users too)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_plots(summary, out)
    write_report(summary, out)
    log(f"moe-stability: done in {summary['seconds'] / 60:.1f} min -> {out / 'report.md'}")
    return out


def rerender(out: Path) -> Path:
    """Rewrite the plots and report.md of a finished study from its results.json."""
    from gspo.experiments.moe_plots import write_plots
    from gspo.experiments.moe_report import write_report

    summary = json.loads((Path(out) / "results.json").read_text())
    write_plots(summary, Path(out))
    return write_report(summary, Path(out))


def _run_jobs(jobs: list[tuple[str, tuple]], workers: int, log) -> list[tuple[str, object]]:
    """Run jobs in order (workers=1) or in a pool of fresh single-threaded processes."""
    if workers == 1:
        return [_log_done(_job(job), log) for job in jobs]
    context = get_context("spawn")  # no forked torch thread pools; each worker sets one thread
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread) as pool:
        futures = [pool.submit(_job, job) for job in jobs]
        return [_log_done(f.result(), log) for f in futures]


def _job(job: tuple[str, tuple]) -> tuple[str, object]:
    kind, args = job
    _one_thread()
    if kind == "run":
        from gspo.experiments.logratio_bins import LogRatioBins
        from gspo.experiments.moe_arms import ARMS, run_arm

        arm, seed, settings, run_dir = args
        bins = LogRatioBins()
        result = run_arm(ARMS[arm], seed, settings, run_dir, bins)
        result["bins"] = bins.to_dict()
        return kind, result
    from gspo.experiments.volatility_depth import model_expert_shares, probe_volatility

    return kind, (probe_volatility(*args) if kind == "probe" else model_expert_shares(*args))


def _log_done(result: tuple[str, dict], log) -> tuple[str, dict]:
    kind, r = result
    if kind == "run":
        last = r["evals"][-1]
        log(f"  {r['arm']} seed {r['seed']}: held-out {r['evals'][0]['eval/accuracy']:.1%} -> "
            f"{last['eval/accuracy']:.1%} sampled ({r['seconds']:.0f} s)")
    elif kind == "probe":
        shares = ", ".join(f"lr {lr}: {v['response']:.2%}" for lr, v in r["lrs"].items())
        log(f"  volatility depth {r['depth']} seed {r['seed']}: {shares} ({r['seconds']:.0f} s)")
    return result


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and results stay bit-exact


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(text)
    return lowered in {"true", "1", "yes"}


def main(args: list[str]) -> int:
    """CLI entry: ``gspo experiment moe-stability [key=value ...]``."""
    if any(a in ("-h", "--help") for a in args):
        from gspo.cli_args import fit

        print(fit(HELP))
        return 0
    run_moe_stability(parse_options(args))
    return 0
