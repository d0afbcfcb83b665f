"""``gspo plot RUN [out=PNG]``: one PNG with a run's curves, because people would rather look than read.

Each per-step series is drawn raw (faint) with an exponential moving average over it; held-out
evaluations (``eval/*`` records: before training, every ``eval.every`` steps, after) are drawn as
points joined by lines. The title names the algorithm and the settings that shape the curves, read
from the run's ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from gspo.cli_args import Command, Flag, Option, parse, render_help
from gspo.errors import GspoError

PLOT = Command(
    "plot", "PNG of a run's curves (reward, accuracy, clip fraction, KL, length, ratio spread)",
    positionals=(("RUN", "run directory (holds metrics.jsonl)"),),
    required=1,
    options=(Option("out", "", "output PNG (default: RUN/curves.png)"),),
    flags=(Flag("--out", "PNG", "deprecated: write out=PNG", alias_of="out"),),
    description="Writes a PNG of a run's training curves (raw and smoothed) and held-out accuracy.",
)

# (title, [(metric key, label)]) per panel.
PANELS = (
    ("reward", [("reward/mean", "mean reward")]),
    ("accuracy", [("reward/accuracy", "train (sampled)"), ("eval/accuracy", "held-out (sampled)"),
                  ("eval/greedy_accuracy", "held-out (greedy)")]),
    ("clip fraction", [("loss/clip_frac", "mean over the step's minibatches"),
                       ("onpolicy/clip_frac", "first minibatch (on-policy: 0 by construction)")]),
    ("KL(old || new)", [("kl/old_new", "k3 estimate")]),
    ("response length", [("response/length_mean", "mean tokens")]),
    ("log-ratio spread", [("logratio/token_std", "token std"), ("logratio/seq_std", "sequence std")]),
)
# A caption under a panel whose level is easy to misread (docs/objectives.md, "Reading the clip fraction").
CAPTIONS = {
    "clip fraction": "first minibatch: pi_theta = pi_old, ratio 1, nothing clipped. GSPO on 4-8 token answers\n"
                     "clips far more than the paper's ~0.15 (long responses): docs/objectives.md",
}
SPARSE_POINTS = 12  # fewer points than this: markers, no smoothing (nothing to average out)


def run_plot(args: list[str]) -> int:
    parsed = parse(PLOT, args)
    if parsed.help:
        print(render_help(PLOT))
        return 0
    out = parsed.options.get("out")
    print(plot_run(Path(parsed.positional(0)), Path(out) if out else None))
    return 0


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise GspoError(f"'{run_dir}' has no metrics.jsonl; pass a run directory written by gspo train")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with weight 2 / (span + 1), bias-corrected so it starts at the data."""
    alpha = 2.0 / (span + 1)
    out, mean, weight = [], 0.0, 0.0
    for value in values:
        mean = (1 - alpha) * mean + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def run_title(run_dir: Path) -> str:
    """``gspo on tiny-arith: 16 prompts x 8, lr 1e-4, clip 3e-4 / 4e-4, ...`` from config.json, or the path."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        from gspo.config.schema import CLIP_DEFAULTS

        algorithm, rollout, loss, optim = config["algorithm"], config["rollout"], config["loss"], config["optim"]
        low_default, high_default = CLIP_DEFAULTS.get(algorithm, (None, None))
        low = low_default if loss.get("clip_low") is None else loss["clip_low"]
        high = high_default if loss.get("clip_high") is None else loss["clip_high"]
        settings = [f"{rollout['prompts_per_step']} prompts x {rollout['group_size']}",
                    f"lr {_number(optim['lr'])}", f"clip {_number(low)} / {_number(high)}", f"{optim['minibatches']} minibatches",
                    f"temperature {rollout['temperature']:g}"]
        if loss.get("beta"):
            settings.append(f"KL beta {_number(loss['beta'])}")
        if config.get("moe", {}).get("routing_replay", "off") != "off":
            settings.append(f"routing replay {config['moe']['routing_replay']}")
        return f"{algorithm} on {Path(config['model']).name}: {', '.join(settings)}\n{run_dir}"
    except (OSError, ValueError, KeyError, TypeError):  # no or an older config.json: the path alone
        return str(run_dir)


def _number(value: float) -> str:
    """1e-4, 3e-4, 0.2, 0.28: short, as a config would be written."""
    if value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``run_dir/curves.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, series) in zip(axes.flat, PANELS):
        for key, label in series:
            points = sorted((r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)))
            if points:
                _plot_series(ax, points, label, smooth=not key.startswith("eval/"))
        ax.set_title(title)
        ax.set_xlabel("step")
        if title in CAPTIONS:
            ax.text(0.0, -0.22, CAPTIONS[title], transform=ax.transAxes, fontsize=7, va="top", color="0.35")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(run_title(run_dir))
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_series(ax, points: list[tuple[int, float]], label: str, *, smooth: bool = True) -> None:
    """Raw points (faint) under their EMA; evaluations and short series as marked points."""
    xs, ys = zip(*points)
    if not smooth or len(points) < SPARSE_POINTS:
        ax.plot(xs, ys, label=label, marker="o", markersize=4, linewidth=1.2)
        return
    (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
    ax.plot(xs, ema(list(ys), span=max(2, len(ys) // 10)), color=raw.get_color(), linewidth=1.8,
            label=f"{label} (EMA)")
