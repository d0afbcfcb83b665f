"""Reduce the study's raw runs and probes to the numbers the report states (results.json).

Every per-seed quantity is kept with its mean, min and max over seeds, so the report can say how
much of a difference is larger than the seed spread. Conventions:

- clip fractions are token-weighted (a clipped GSPO response counts all its tokens, as the paper's
  figure does); "off-policy" means minibatches 2..M of each rollout batch, "on-policy" minibatch 1;
- volatility "after k updates" is the trainer's ``moe/volatility`` on minibatch k + 1: experts of the
  behaviour policy vs the policy after k optimizer steps, on that minibatch's response tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from gspo.experiments.logratio_bins import LogRatioBins
from gspo.experiments.moe_arms import ARMS


def stats(values: list[float]) -> dict:
    """Mean, min, max and the values themselves (NaN-free input expected)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "values": []}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def band(curves: list[list[float]]) -> dict:
    """Per-position mean / min / max over seeds of equally long curves."""
    columns = list(zip(*curves))
    return {"mean": [sum(c) / len(c) for c in columns], "min": [min(c) for c in columns],
            "max": [max(c) for c in columns]}


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return sum(values) / len(values) if values else float("nan")


def _minibatch_mean(run: dict, key: str, which: str) -> float:
    """Mean of ``key`` over steps, on the on-policy (first) or off-policy (later) minibatches."""
    pick = (lambda mbs: mbs[:1]) if which == "onpolicy" else (lambda mbs: mbs[1:])
    return _mean([mb[key] for mbs in run["minibatches"] for mb in pick(mbs) if key in mb])


def _step_mean(run: dict, key: str) -> float:
    return _mean([s[key] for s in run["steps"] if key in s])


def arm_summary(name: str, runs: list[dict]) -> dict:
    """Curves with seed bands, accuracy before/after, clipping, volatility, log-ratio spreads."""
    runs = sorted(runs, key=lambda r: r["seed"])
    evals = [r["evals"] for r in runs]
    out = {"label": ARMS[name].label, "overrides": list(ARMS[name].overrides), "seeds": [r["seed"] for r in runs],
           "steps": [s["step"] for s in runs[0]["steps"]],
           "reward": band([[s["reward/mean"] for s in r["steps"]] for r in runs]),
           "eval_steps": [e["step"] for e in evals[0]],
           "eval_sampled": band([[e["eval/accuracy"] for e in ev] for ev in evals]),
           "eval_greedy": band([[e.get("eval/greedy_accuracy", float("nan")) for e in ev] for ev in evals]),
           "seconds": stats([r["seconds"] for r in runs])}
    for when, index in (("before", 0), ("after", -1)):
        out[when] = {"sampled": stats([ev[index]["eval/accuracy"] for ev in evals]),
                     "greedy": stats([ev[index].get("eval/greedy_accuracy", float("nan")) for ev in evals])}
    out["lift"] = {kind: stats([ev[-1][key] - ev[0][key] for ev in evals])
                   for kind, key in (("sampled", "eval/accuracy"), ("greedy", "eval/greedy_accuracy"))}
    out["clip"] = {
        "offpolicy": stats([_minibatch_mean(r, "loss/clip_frac", "offpolicy") for r in runs]),
        "all": stats([_step_mean(r, "loss/clip_frac") for r in runs]),
        "onpolicy": stats([_minibatch_mean(r, "loss/clip_frac", "onpolicy") for r in runs]),
        "onpolicy_outside_band": stats([_minibatch_mean(r, "ratio/outside_band_frac", "onpolicy") for r in runs]),
        "curve": band([[s.get("loss/clip_frac", 0.0) for s in r["steps"]] for r in runs]),
    }
    if any("loss/seq_clip_frac" in mb for r in runs for mbs in r["minibatches"] for mb in mbs):
        out["clip"]["offpolicy_sequences"] = stats([_minibatch_mean(r, "loss/seq_clip_frac", "offpolicy") for r in runs])
        out["clip"]["onpolicy_sequences"] = stats([_minibatch_mean(r, "loss/seq_clip_frac", "onpolicy") for r in runs])
    minibatches = max(len(mbs) for r in runs for mbs in r["minibatches"])
    out["volatility_after_updates"] = [
        _mean([mbs[k]["moe/volatility"] for r in runs for mbs in r["minibatches"]
               if k < len(mbs) and "moe/volatility" in mbs[k]]) for k in range(1, minibatches)]
    out["logratio"] = {key: stats([_minibatch_mean(r, f"logratio/{key}", "offpolicy") for r in runs])
                       for key in ("token_std", "seq_std")}
    out["mismatch"] = {key: stats([_step_mean(r, f"mismatch/{key}") for r in runs])
                       for key in ("token_std", "seq_std", "token_abs_mean")}
    bins = LogRatioBins.merged([r["bins"] for r in runs])
    out["length_bins"] = {"offpolicy": bins.table("offpolicy"), "onpolicy": bins.table("onpolicy")}
    return out


def depth_summary(probes: list[dict]) -> list[dict]:
    """Per depth and learning rate: volatility on response tokens over seeds, and per layer."""
    rows = []
    for depth in sorted({p["depth"] for p in probes}):
        group = [p for p in probes if p["depth"] == depth]
        for lr in group[0]["lrs"]:
            per_layer = [p["lrs"][lr]["per_layer"] for p in group]
            rows.append({"depth": depth, "lr": float(lr), "response": stats([p["lrs"][lr]["response"] for p in group]),
                         "all_tokens": stats([p["lrs"][lr]["all_tokens"] for p in group]),
                         "per_layer": [sum(col) / len(col) for col in zip(*per_layer)],
                         "probe_reward": stats([p["reward_mean"] for p in group]),
                         "busiest_expert_share": stats([max(p["busiest_expert_share"]) for p in group]),
                         "seconds": stats([p["seconds"] for p in group])})
    return rows


def summarise(runs: list[dict], probes: list[dict], *, options, model: str) -> dict:
    """Everything the report and plots need, JSON-able."""
    names = [n for n in ARMS if any(r["arm"] == n for r in runs)]
    arms = {n: arm_summary(n, [r for r in runs if r["arm"] == n]) for n in names}
    warm = Path(model) / "warm_start.json"
    summary = {"options": asdict(options), "model": model, "arms": arms, "volatility_depth": depth_summary(probes),
               "warm_start": json.loads(warm.read_text()) if warm.exists() else None}
    if "gspo" in arms and "grpo" in arms:
        gspo, grpo = arms["gspo"]["clip"], arms["grpo"]["clip"]
        summary["clip_ratio"] = {which: gspo[which]["mean"] / max(grpo[which]["mean"], 1e-12)
                                 for which in ("offpolicy", "all")}
    return summary
