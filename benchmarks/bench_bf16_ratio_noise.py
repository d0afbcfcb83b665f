"""What bfloat16 costs GSPO in precision: rounding noise in the sequence log-ratio vs the 3e-4 / 4e-4 clip band.

One rollout batch (16 prompts x 8 responses, 64 tokens, the arithmetic task) from the benchmark's models
(see bench_vs_trl.py), sampled by a bfloat16 copy of the policy; then, on the SAME weights (so every
true ratio is exactly 1), per-token differences of log-probabilities and the share of sequences whose
length-normalised log-ratio s_i falls outside GSPO's band [-3e-4, +4e-4] (SPEC eq. 5):

- bfloat16 sampler vs float32 recomputation (what ``loss.old_logprobs=rollout`` would train on);
- bfloat16-autocast training forward vs float32 old log-probabilities (gspo before the fix that
  recomputes old log-probabilities under the training autocast);
- bfloat16-autocast training forward vs old log-probabilities under the same autocast (gspo now).

A sequence outside the band is clipped (zero gradient) when its advantage pushes further out, so noise
alone removes that share of the on-policy signal.

    PYTHONPATH=src python benchmarks/bench_bf16_ratio_noise.py [--size tiny|small|both]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vs_trl's model builder and workload
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

CLIP_LOW, CLIP_HIGH = 3e-4, 4e-4  # GSPO paper defaults


def band_stats(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Token |a - b| mean, std of the sequence log-ratio and the share of sequences outside the band."""
    diff = torch.where(mask, a - b, torch.zeros_like(a))  # (B, T)
    seq = diff.sum(1) / mask.sum(1).clamp_min(1)  # (B,) length-normalised log-ratio
    outside = ((seq < -CLIP_LOW) | (seq > CLIP_HIGH)).float().mean()
    return {"token_abs_mean": float(diff[mask].abs().mean()), "seq_std": float(seq.std()),
            "outside_band_frac": float(outside)}


def measure(size: str, directory: Path) -> dict[str, dict[str, float]]:
    from bench_vs_trl import GROUP_SIZE, NEW_TOKENS, PROMPTS_PER_BATCH, build_model

    from gspo.config.load import load_config
    from gspo.trainer.trainer import Trainer

    build_model(size, directory)
    trainer = Trainer.from_config(load_config(None, [f"model={directory}", "device=cpu", "log.tensorboard=false",
                                         f"rollout.prompts_per_step={PROMPTS_PER_BATCH}",
                                         f"rollout.group_size={GROUP_SIZE}", f"rollout.max_new_tokens={NEW_TOKENS}",
                                         "rollout.ignore_eos=true", "rollout.engine_dtype=bfloat16"]), run_dir=None)
    rollout = trainer.collector.collect(trainer._take_shard(), seed=0).rollout
    ids, attn, mask = rollout.input_ids, rollout.attention_mask, rollout.completion_mask
    minibatch = PROMPTS_PER_BATCH * GROUP_SIZE // 4
    with torch.no_grad():
        fp32 = trainer.policy(ids, attn, NEW_TOKENS)  # (B, T) one no-grad pass, float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            old_bf16 = trainer.policy(ids, attn, NEW_TOKENS).float()  # the no-grad pass under autocast
            train_bf16 = torch.cat([trainer.policy(ids[i:i + minibatch], attn[i:i + minibatch], NEW_TOKENS).float()
                                    for i in range(0, len(ids), minibatch)])  # minibatch-sized training forwards
    return {"bf16 sampler vs fp32 recompute": band_stats(rollout.logprobs, fp32, mask),
            "bf16 training vs fp32 old (before)": band_stats(train_bf16, fp32, mask),
            "bf16 training vs bf16 old (now)": band_stats(train_bf16, old_bf16, mask)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "both"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for size in (["tiny", "small"] if args.size == "both" else [args.size]):
            for name, stats in measure(size, Path(tmp) / size).items():
                print(f"{size:5s} {name:36s} token |diff| {stats['token_abs_mean']:.2e}  "
                      f"seq log-ratio std {stats['seq_std']:.2e}  outside band {100 * stats['outside_band_frac']:.0f}%")


if __name__ == "__main__":
    main()
