"""docs/memory.md's table: :mod:`gspo.memory`'s per-GPU peak for Qwen3 shapes x strategies x lengths.

    PYTHONPATH=src python benchmarks/memory_table.py

Computed from the estimate, not measured (no GPU has run gspo yet): each cell is what ``gspo train`` would
decide on an 80 GB H100 with ``optim.gradient_checkpointing=auto``, ``optim.micro_batch_tokens=auto`` and
(FSDP2) ``rollout.sampler_weights=auto``, and the estimate of the run so configured (or "does not fit" with what the refusal names). The CPU rows
measured by benchmarks/measure_memory.py are printed from benchmarks/results/memory_cpu.json beside their
estimate.
"""

from __future__ import annotations

import json
from pathlib import Path

from gspo.errors import ConfigError
from gspo.memory import GB, ModelShape, RunShape, estimate
from gspo.memory_plan import plan

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
# a rollout batch of 64 responses (e.g. 8 prompts x 8) behind 256-token prompts, 4 minibatches, bfloat16
# compute and sampler (the CUDA default), float32 master weights and AdamW, no LoRA, no KL reference
RESPONSES, PROMPT, MINIBATCHES = 64, 256, 4
LENGTHS = (1024, 8192)
STRATEGIES = [("1 GPU", "ddp", 1), ("DDP x8", "ddp", 8), ("FSDP2 x8", "fsdp", 8)]
H100 = 80 * GB


def run_shape(strategy: str, gpus: int, response: int) -> RunShape:
    local = RESPONSES // gpus
    return RunShape(responses=local, minibatch_rows=local // MINIBATCHES, micro_rows=0, micro_tokens=0,
                    prompt_tokens=PROMPT, response_tokens=response, compute="bfloat16", sampler="bfloat16",
                    processes=gpus, strategy=strategy, device="cuda", sampler_can_shard=strategy == "fsdp")


def cell(shape: ModelShape, strategy: str, gpus: int, response: int) -> str:
    """``31 (ckpt, 2 rows, shards)``: GB per GPU and what auto chose (``shards``: the sampler through the FSDP2
    shards); ``no: 180 GB`` when nothing auto picks fits."""
    run = run_shape(strategy, gpus, response)
    try:
        decided = plan(shape, run, checkpointing="auto", micro_batch_tokens=-1, available=H100,
                       sampler_weights="auto")
    except ConfigError as exc:
        return f"no: {str(exc).split('about ')[1].split(' GB')[0]} GB"
    rows = decided.micro_batch_tokens // run.sequence_tokens if decided.micro_batch_tokens else run.minibatch_rows
    choices = ["ckpt"] if decided.checkpointing else []
    choices.append(f"{rows} row{'s' if rows > 1 else ''}")
    if decided.sampler_weights == "shards":
        choices.append("shards")
    return f"{decided.estimate.total / GB:.0f} ({', '.join(choices)})"


def main() -> None:
    head = " | ".join(f"{name}, {length // 1024}k" for name, _, _ in STRATEGIES for length in LENGTHS)
    print(f"| model (params) | {head} |")
    print("|---|" + "---:|" * len(STRATEGIES) * len(LENGTHS))
    for name, values in QWEN3.items():
        shape = ModelShape.from_config({**values, "vocab_size": 151936})
        cells = " | ".join(cell(shape, strategy, gpus, length)
                           for _, strategy, gpus in STRATEGIES for length in LENGTHS)
        print(f"| {name} ({shape.params / 1e9:.2f}B) | {cells} |")
    results = Path(__file__).resolve().parent / "results" / "memory_cpu.json"
    if results.exists():
        data = json.loads(results.read_text())
        print(f"\nMeasured on the CPU ({data['machine']}): ~103M Qwen3, 151,936 vocabulary, 16 responses\n")
        print("| response tokens | dtype | measured peak RSS | estimate | estimate / measured |")
        print("|---:|---|---:|---:|---:|")
        for case in sorted(data["cases"], key=lambda c: (c["dtype"], c["new_tokens"])):
            est = measured_estimate(case)
            print(f"| {case['new_tokens']} | {case['dtype']} | {case['peak_rss_bytes'] / GB:.2f} GiB | "
                  f"{est / GB:.2f} GiB | {est / case['peak_rss_bytes']:.2f} |")


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
