"""The study's PNG figures: curves with seed bands, clipping, volatility, log-ratio spread, precision."""

from __future__ import annotations

from pathlib import Path

PAPER_CLIP = {"gspo": 0.15, "grpo": 0.0013}  # read off the GSPO paper's clipping figure
PAPER_VOLATILITY = (48, 0.10)  # section 5.3: ~10% of activated experts change after one update, 48 layers
COLORS = {"gspo": "tab:blue", "grpo": "tab:red", "grpo_r2": "tab:orange", "gspo_bf16": "tab:cyan",
          "grpo_bf16": "tab:pink"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, xs, curve: dict, name: str, label: str) -> None:
    ax.plot(xs, curve["mean"], color=COLORS.get(name), label=label, linewidth=1.4)
    ax.fill_between(xs, curve["min"], curve["max"], color=COLORS.get(name), alpha=0.2, linewidth=0)


def _finish(fig, ax_list, path: Path) -> Path:
    for ax in ax_list:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _moving_average(curve: dict, window: int) -> dict:
    """Trailing moving average of each of mean / min / max (per-step rewards vary with the prompts drawn)."""
    def smooth(values: list[float]) -> list[float]:
        return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                for i in range(len(values))]

    return {k: smooth(curve[k]) for k in ("mean", "min", "max")}


REWARD_WINDOW = 5  # steps
MIN_BIN_RESPONSES = 20  # length bins with fewer responses are too noisy to plot (they stay in the table)


def plot_curves(summary: dict, path: Path, names: tuple[str, ...]) -> Path:
    """Training reward and held-out accuracy (sampled T=1, greedy): mean line, min/max band over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        arm = summary["arms"][name]
        _band(axes[0], arm["steps"], _moving_average(arm["reward"], REWARD_WINDOW), name, arm["label"])
        _band(axes[1], arm["eval_steps"], arm["eval_sampled"], name, arm["label"])
        _band(axes[2], arm["eval_steps"], arm["eval_greedy"], name, arm["label"])
    for ax, title in zip(axes, (f"training reward, moving average over {REWARD_WINDOW} steps", "held-out accuracy, sampled T=1",
                                "held-out accuracy, greedy")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    fig.suptitle(f"seeds {summary['arms'][names[0]]['seeds']}: line = mean, band = min..max", fontsize=9)
    out = _finish(fig, axes, path)
    plt.close(fig)
    return out


def plot_clipping(summary: dict, path: Path) -> Path:
    """Token clip fraction per step (log scale) and the off-policy average per algorithm vs the paper."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [n for n in ("gspo", "grpo", "grpo_r2") if n in summary["arms"]]
    for name in names:
        arm = summary["arms"][name]
        curve = {k: [max(v, 1e-5) for v in arm["clip"]["curve"][k]] for k in ("mean", "min", "max")}
        _band(axes[0], arm["steps"], curve, name, arm["label"])
    axes[0].set_yscale("log")
    axes[0].set_title("clipped share of response tokens per step (all minibatches)", fontsize=10)
    axes[0].set_xlabel("step")
    clip = [summary["arms"][n]["clip"]["offpolicy"] for n in names]
    xs = range(len(names))
    bars = axes[1].bar(xs, [c["mean"] for c in clip], color=[COLORS[n] for n in names],
                       yerr=[[c["mean"] - c["min"] for c in clip], [c["max"] - c["mean"] for c in clip]], capsize=4)
    axes[1].bar_label(bars, fmt="%.4f", fontsize=7, label_type="center")
    for name, value in PAPER_CLIP.items():
        axes[1].axhline(value, color=COLORS[name], linestyle=":", linewidth=1, label=f"paper {name.upper()} ~{value}")
    axes[1].set_xticks(list(xs), [summary["arms"][n]["label"] for n in names], fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_title("clipped token share, off-policy minibatches (bar: mean, whisker: seed min..max)", fontsize=9)
    out = _finish(fig, axes, path)
    plt.close(fig)
    return out


def plot_volatility(summary: dict, path: Path) -> Path:
    """Volatility after one update vs depth (per learning rate) and after k updates during training."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    rows = summary["volatility_depth"]
    for lr in sorted({r["lr"] for r in rows}):
        sel = [r for r in rows if r["lr"] == lr]
        xs = [r["depth"] for r in sel]
        axes[0].plot(xs, [r["response"]["mean"] for r in sel], marker="o", label=f"one update, lr {lr:g}")
        axes[0].fill_between(xs, [r["response"]["min"] for r in sel], [r["response"]["max"] for r in sel], alpha=0.2)
    depth, share = PAPER_VOLATILITY
    axes[0].set_title(f"experts changed after one update vs depth (paper: ~{share:.0%} at {depth} layers)", fontsize=9)
    axes[0].set_xlabel("MoE layers")
    axes[0].set_xscale("log", base=2)
    for name in ("gspo", "grpo"):
        arm = summary["arms"].get(name)
        if arm and arm["volatility_after_updates"]:
            ks = list(range(1, len(arm["volatility_after_updates"]) + 1))
            axes[1].plot(ks, arm["volatility_after_updates"], marker="o", color=COLORS[name], label=arm["label"])
    axes[1].set_title("during training (embedded depth): experts changed after k updates", fontsize=9)
    axes[1].set_xlabel("optimizer steps since the rollout (k)")
    top = max(r["lr"] for r in rows)
    for r in (r for r in rows if r["lr"] == top):
        axes[2].plot(range(1, r["depth"] + 1), r["per_layer"], marker="o", label=f"{r['depth']}-layer model")
    axes[2].set_title(f"one update at lr {top:g}: experts changed per layer (seed mean)", fontsize=9)
    axes[2].set_xlabel("layer")
    out = _finish(fig, axes, path)
    plt.close(fig)
    return out


def plot_logratio_length(summary: dict, path: Path) -> Path:
    """Spread of token vs sequence log-ratios per response length, off-policy minibatches."""
    plt = _pyplot()
    names = [n for n in ("gspo", "grpo", "grpo_r2") if n in summary["arms"]]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        table = [row for row in summary["arms"][name]["length_bins"]["offpolicy"] if row["responses"] >= MIN_BIN_RESPONSES]
        xs = [row["length"] for row in table]
        ax.plot(xs, [row["token_std"] for row in table], marker="o", label="token log-ratio std")
        ax.plot(xs, [row["seq_std"] for row in table], marker="s", label="sequence log-ratio std (eq. 7)")
        ax.plot(xs, [row["iid_seq_std"] for row in table], linestyle="--", label="token std / sqrt(length)")
        ax.set_title(summary["arms"][name]["label"], fontsize=10)
        ax.set_xlabel("response length (tokens)")
    out = _finish(fig, axes[0], path)
    plt.close(fig)
    return out


def plot_precision(summary: dict, path: Path) -> Path:
    """bf16-sampler log-probabilities: mismatch spread, on-policy clipping, and the accuracy curves."""
    plt = _pyplot()
    arms = summary["arms"]
    names = [n for n in ("gspo_bf16", "grpo_bf16") if n in arms]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    xs = range(len(names))
    width = 0.35
    for offset, key, label in ((-width / 2, "token_std", "token"), (width / 2, "seq_std", "sequence")):
        axes[0].bar([x + offset for x in xs], [arms[n]["mismatch"][key]["mean"] for n in names], width, label=label)
    axes[0].set_title("std of log pi_fp32 - log pi_bf16 (sampled tokens)", fontsize=9)
    for offset, key, label in ((-width / 2, "onpolicy", "clipped (gradient zeroed)"),
                               (width / 2, "onpolicy_outside_band", "ratio outside the clip band")):
        bars = axes[1].bar([x + offset for x in xs], [arms[n]["clip"][key]["mean"] for n in names], width, label=label)
        axes[1].bar_label(bars, fmt="%.3f", fontsize=7)
    axes[1].set_title("token share, on-policy minibatch (precision mismatch only)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks(list(xs), [arms[n]["label"] for n in names], fontsize=7)
    for name in names + [n for n in ("gspo", "grpo") if n in arms]:
        _band(axes[2], arms[name]["eval_steps"], arms[name]["eval_sampled"], name, arms[name]["label"])
    axes[2].set_title("held-out accuracy, sampled T=1", fontsize=9)
    axes[2].set_xlabel("step")
    out = _finish(fig, axes, path)
    plt.close(fig)
    return out


def write_plots(summary: dict, out: Path) -> list[Path]:
    """Every figure the report links; returns their paths."""
    main = tuple(n for n in ("gspo", "grpo", "grpo_r2") if n in summary["arms"])
    paths = [plot_curves(summary, out / "curves.png", main), plot_clipping(summary, out / "clipping.png"),
             plot_volatility(summary, out / "volatility.png"), plot_logratio_length(summary, out / "logratio_length.png")]
    if any(n in summary["arms"] for n in ("gspo_bf16", "grpo_bf16")):
        paths.append(plot_precision(summary, out / "precision.png"))
    return paths
