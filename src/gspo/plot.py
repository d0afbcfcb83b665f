"""``gspo plot RUN``: one PNG with a run's curves, because people would rather look than read."""

from __future__ import annotations

import json
from pathlib import Path

from gspo.errors import GspoError

# (title, [(metric key, label)]) per panel.
PANELS = (
    ("reward", [("reward/mean", "mean reward")]),
    ("accuracy", [("reward/accuracy", "train (sampled)"), ("eval/accuracy", "held-out (sampled)"),
                  ("eval/greedy_accuracy", "held-out (greedy)")]),
    ("clip fraction", [("loss/clip_frac", "all minibatches"), ("onpolicy/clip_frac", "on-policy minibatch")]),
    ("KL(old || new)", [("kl/old_new", "k3 estimate")]),
    ("response length", [("response/length_mean", "mean tokens")]),
    ("log-ratio spread", [("logratio/token_std", "token std"), ("logratio/seq_std", "sequence std")]),
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise GspoError(f"'{run_dir}' has no metrics.jsonl; pass a run directory written by gspo train")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``run_dir/curves.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, series) in zip(axes.flat, PANELS):
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                marker = "o" if len(points) < 12 else None
                ax.plot(xs, ys, label=label, marker=marker, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
