"""The embedded tiny Mixture-of-Experts policy (``model=tiny-moe``): a supervised warm start.

GSPO section 5.3 studies RL on a Mixture-of-Experts policy (Qwen3-30B-A3B: 128 experts, 8 active per
token, 48 layers). ``tiny-moe`` is the same architecture (``Qwen3MoeForCausalLM``, every layer sparse,
top-k gate weights renormalised) at toy size: 8 experts, top-2 per token, three layers by default,
warm-started with the dense default's code, :func:`gspo.sft.warm_start` (cross-entropy on answer +
EOS, AdamW, warm-up then cosine, early stop on a *training-split* greedy probe) on the embedded
arithmetic task, with its own hyper-parameters (below). The calibration target is the dense model's
regime: greedy held-out accuracy roughly 40-70% with sampled (T = 1) accuracy clearly lower, so RL has
something to sharpen.

Reproducible: the same call (seed, steps, depth) in the same environment writes the same weights
(one intra-op thread, seeded init and data order; see :mod:`gspo.sft`). Rebuild the embedded copy with
``gspo sft model=tiny-moe into_package=true`` (writes ``src/gspo/assets/tiny-moe-arith``); without
``into_package``, ``gspo sft model=tiny-moe`` and ``python -m gspo.experiments.moe_warm_start [OUT_DIR]``
write ``sft/tiny-moe`` in the working directory and leave the package as installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gspo.sft import warm_start

DEFAULT_LAYERS = 3  # ~1.04M parameters, 4.2 MB of float32 safetensors (< 5 MB); 2 layers reached only 14% greedy
DEFAULT_STEPS = 500  # cosine-schedule length and upper bound; the probe stopped seed 0 at step 280
DEFAULT_LR = 5e-3  # measured: 3 layers at 5e-3 learn the task; 2 layers at 3e-3 / 1e-2 stayed at 8% / 14% greedy
DEFAULT_BATCH = 128
# Early stop when greedy accuracy on 256 fixed *training* rows reaches this: lands in the same partly
# learned regime for any seed (the task is learned in a sudden transition whose timing varies).
TARGET_PROBE_ACCURACY = 0.6
MODEL_KWARGS = dict(num_experts=8, top_k=2)  # Qwen3-MoE routing shape at toy size


def moe_recipe(*, num_layers: int = DEFAULT_LAYERS, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
               target_accuracy: float | None = TARGET_PROBE_ACCURACY) -> dict:
    """Keyword arguments of :func:`gspo.sft.warm_start` that build the tiny MoE (for ``gspo sft`` too).

    Every argument that changes the weights is pinned here, so a change of ``warm_start``'s defaults
    (calibrated for the dense model) cannot silently change the MoE checkpoint.
    """
    return dict(arch="qwen3-moe", steps=steps, lr=lr, batch_size=DEFAULT_BATCH, weight_decay=0.0,
                label_smoothing=0.0, model_kwargs={**MODEL_KWARGS, "num_layers": num_layers}, task_kwargs={},
                target_accuracy=target_accuracy, check_every=20, n_probe=256, max_new_tokens=8, num_threads=1)


def warm_start_moe(out_dir: str | Path, *, seed: int = 0, steps: int = DEFAULT_STEPS,
                   num_layers: int = DEFAULT_LAYERS, lr: float = DEFAULT_LR,
                   target_accuracy: float | None = TARGET_PROBE_ACCURACY, n_eval: int = 256,
                   on_step=None) -> Path:
    """Warm-start a tiny Qwen3-MoE on arithmetic and save model + tokenizer + ``warm_start.json``.

    ``warm_start.json`` (written by :func:`gspo.sft.warm_start`) holds the arguments, losses, the probe
    history and held-out greedy / sampled accuracy; this adds the recipe's name and the weights' size.
    """
    out = warm_start(out_dir, seed=seed, n_eval=n_eval, on_step=on_step,
                     **moe_recipe(num_layers=num_layers, steps=steps, lr=lr, target_accuracy=target_accuracy))
    report_path = out / "warm_start.json"
    report = json.loads(report_path.read_text())
    report["recipe"] = "gspo.experiments.moe_warm_start.warm_start_moe"
    report["weights_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m gspo.experiments.moe_warm_start [OUT_DIR]``: the tiny MoE warm start into OUT_DIR (default
    ``sft/tiny-moe``); ``gspo sft model=tiny-moe`` is the same with progress (and ``into_package=true``)."""
    from gspo.sft_cli import output_dir

    args = list(sys.argv[1:] if argv is None else argv)
    print(warm_start_moe(output_dir("tiny-moe", args[0] if args else "")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
