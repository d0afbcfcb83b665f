"""docs/memory.md's table: :mod:`gspo.memory`'s per-GPU peak for Qwen3 shapes, strategies and GPU counts.

    PYTHONPATH=src python benchmarks/memory_table.py

Computed, not measured (no GPU was available); the CPU rows measured by benchmarks/measure_memory.py are
printed from benchmarks/results/memory_cpu.json beside their estimate.
"""

from __future__ import annotations

import json
from pathlib import Path

from gspo.memory import GB, ModelShape, RunShape, estimate

# config.json values of the published Qwen3 models (Hugging Face Hub, Qwen/Qwen3-*)
QWEN3 = {
    "Qwen3-0.6B": dict(num_hidden_layers=28, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(num_hidden_layers=28, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": dict(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "Qwen3-30B-A3B": dict(num_hidden_layers=48, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768),
}
RESPONSES, PROMPT, RESPONSE, MINIBATCHES, MICRO_ROWS = 64, 256, 1024, 4, 4
STRATEGIES = [("single", 1), ("ddp", 2), ("ddp", 8), ("fsdp", 2), ("fsdp", 8)]


def cell(shape: ModelShape, strategy: str, gpus: int, checkpointing: bool) -> float:
    local = RESPONSES // gpus
    run = RunShape(responses=local, minibatch_rows=local // MINIBATCHES, micro_rows=MICRO_ROWS, micro_tokens=0,
                   prompt_tokens=PROMPT, response_tokens=RESPONSE, compute="bfloat16", sampler="bfloat16",
                   checkpointing=checkpointing, processes=gpus, strategy="ddp" if strategy == "single" else strategy,
                   device="cuda")
    return estimate(shape, run).total / GB


def main() -> None:
    head = " | ".join(f"{s} x{n}" if s != "single" else "1 GPU" for s, n in STRATEGIES)
    print(f"| model (params) | checkpointing | {head} |")
    print("|---|---|" + "---:|" * len(STRATEGIES))
    for name, values in QWEN3.items():
        shape = ModelShape.from_config({**values, "vocab_size": 151936})
        for checkpointing in (False, True):
            cells = " | ".join(f"{cell(shape, s, n, checkpointing):.0f}" for s, n in STRATEGIES)
            print(f"| {name} ({shape.params / 1e9:.2f}B) | {'on' if checkpointing else 'off'} | {cells} |")
    results = Path(__file__).resolve().parent / "results" / "memory_cpu.json"
    if results.exists():
        print("\n| CPU, measured (~103M Qwen3, 151,936 vocab) | response tokens | dtype | measured peak RSS | estimate |")
        print("|---|---:|---|---:|---:|")
        for case in sorted(json.loads(results.read_text())["cases"], key=lambda c: (c["dtype"], c["new_tokens"])):
            print(f"| {case['shape']['hidden_size']} hidden x {case['shape']['num_layers']} layers | {case['new_tokens']} | "
                  f"{case['dtype']} | {case['peak_rss_bytes'] / GB:.2f} GB | {measured_estimate(case) / GB:.2f} GB |")


def measured_estimate(case: dict) -> int:
    """Today's estimate of a measured case (the one stored was the estimator's at measuring time)."""
    sh = case["shape"]
    shape = ModelShape(layers=sh["num_layers"], hidden=sh["hidden_size"], intermediate=sh["intermediate_size"],
                       heads=sh["num_heads"], kv_heads=sh["num_kv_heads"], head_dim=sh["hidden_size"] // sh["num_heads"],
                       vocab=sh["vocab"], tied=True)
    run = RunShape(responses=16, minibatch_rows=4, micro_rows=0, micro_tokens=0, prompt_tokens=case["prompt_tokens"],
                   response_tokens=case["new_tokens"], compute=case["dtype"], sampler=case["dtype"])
    return estimate(shape, run).total


if __name__ == "__main__":
    main()
