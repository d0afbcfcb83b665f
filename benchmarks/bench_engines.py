"""Sampling throughput of the rollout engines: vLLM (in-process) vs gspo's native decode step vs
transformers' forward (``HFEngine(..., decoder="hf")``), and the share of a training step that vLLM's
weight sync takes.

Workload: 128 prompts (12-token arithmetic-like prompts of the character vocabulary) x 64 new tokens,
fixed length (``ignore_eos``), temperature 1, float32, per-row seeds. Models are built locally (no
download): ``tiny`` is the embedded model's shape (~1M parameters), ``small`` the ~17M-parameter Qwen3
of bench_vs_trl.py, ``mid`` (~5M) between them to place the crossover; all with 128 positions.

All three engines live in one process per size (vLLM in-process, with gspo's host-state guard) and run
interleaved: every round runs each engine once, in an order that rotates, so machine load hits all
alike; the first round is a warm-up. Reported: the median tokens/s per engine over the remaining
rounds and the ratios to the native step. The step share: vLLM's ``sync_weights`` time over one
training step made of the vLLM rollout, one training pass over the batch (4 minibatches of 32:
forward, backward, AdamW) and the sync itself.

    OMP_WAIT_POLICY=PASSIVE <vLLM venv>/bin/python benchmarks/bench_engines.py --sizes tiny mid small --rounds 4

Needs vLLM (the CPU tier's venv, docs/vllm.md). ``OMP_WAIT_POLICY=PASSIVE`` is set when unset: on a
shared 2-core machine libgomp's spin-waiting made every op wait for a descheduled thread (see README).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # keyword arguments of gspo.models.tiny.build_tiny_qwen3 (as in bench_vs_trl.py)
    "tiny": {},
    "mid": {"hidden_size": 256, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024},
    "small": {"hidden_size": 384, "num_layers": 8, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1536},
}
MAX_POSITIONS = 128
BATCH, PROMPT_TOKENS, NEW_TOKENS, MINIBATCHES = 128, 12, 64, 4
ENGINES = ("vllm", "native", "hf")


def build(size: str, directory: Path):
    from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3(tokenizer, max_position_embeddings=MAX_POSITIONS, seed=0, **SIZES[size])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.eval(), tokenizer


def engines(model, tokenizer, directory: Path) -> dict:
    from gspo.rollout.hf import HFEngine
    from gspo.rollout.vllm.local import VLLMEngine

    ids = {"pad_token_id": tokenizer.pad_token_id}
    return {
        "vllm": VLLMEngine(directory, eos_ids=[tokenizer.eos_token_id], dtype="float32",
                           max_model_len=MAX_POSITIONS, **ids),
        "native": HFEngine(model, eos_token_id=tokenizer.eos_token_id, decoder="native", **ids),
        "hf": HFEngine(model, eos_token_id=tokenizer.eos_token_id, decoder="hf", **ids),
    }


def prompts(tokenizer, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789+="))
    return [[digits[int(i)] for i in torch.randint(0, len(digits), (PROMPT_TOKENS,), generator=g)]
            for _ in range(BATCH)]


def train_pass_s(model, rollout) -> float:
    """Seconds of one training pass over the rollout: MINIBATCHES x (forward, backward, AdamW step)."""
    from gspo.logprobs import token_logprobs

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    for rows in torch.arange(BATCH).chunk(MINIBATCHES):
        logprobs = token_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                  rollout.completion_ids.shape[1])
        logprobs.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def bench_size(size: str, rounds: int, threads: int) -> dict:
    from gspo.rollout.base import SamplingParams

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build(size, Path(tmp))
        params_count = sum(p.numel() for p in model.parameters())
        built = engines(model, tokenizer, Path(tmp))
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True)
        rates = {name: [] for name in ENGINES}
        syncs, trains = [], []
        for round_index in range(rounds + 1):
            order = ENGINES[round_index % 3:] + ENGINES[:round_index % 3]
            batch = prompts(tokenizer, round_index)
            seeds = [round_index * BATCH + i for i in range(BATCH)]
            for name in order:
                start = time.perf_counter()
                rollout = built[name].generate(batch, params, row_seeds=seeds)
                seconds = time.perf_counter() - start
                if round_index > 0:  # round 0 warms every engine up
                    rates[name].append(int(rollout.lengths.sum()) / seconds)
            start = time.perf_counter()
            built["vllm"].sync_weights(model)
            if round_index > 0:
                syncs.append(time.perf_counter() - start)
                trains.append(train_pass_s(model, rollout))
        built["vllm"].close()
    median = {name: statistics.median(values) for name, values in rates.items()}
    vllm_sample_s = BATCH * NEW_TOKENS / median["vllm"]
    sync_s, train_s = statistics.median(syncs), statistics.median(trains)
    return {"size": size, "params": params_count, "threads": threads, "rounds": rounds,
            "tokens_per_s": median, "all_tokens_per_s": rates,
            "ratio_to_native": {name: median[name] / median["native"] for name in ENGINES},
            "sync_s": sync_s, "train_pass_s": train_s, "vllm_sample_s": vllm_sample_s,
            "sync_share_of_step": sync_s / (vllm_sample_s + train_s + sync_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import vllm

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "vllm": vllm.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                           "load_average": os.getloadavg()},
               "workload": {"batch": BATCH, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS},
               "sizes": [bench_size(size, args.rounds, args.threads) for size in args.sizes]}
    RESULTS.mkdir(exist_ok=True)
    name = "bench_engines.json" if args.sizes == list(SIZES) else f"bench_engines_{'_'.join(args.sizes)}.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2))
    print(f"{'size':6} {'params':>7} | {'vllm':>8} {'native':>8} {'hf':>8} tok/s | vllm/native hf/native | "
          "sync s, share of step")
    for r in results["sizes"]:
        t, q = r["tokens_per_s"], r["ratio_to_native"]
        print(f"{r['size']:6} {r['params'] / 1e6:6.1f}M | {t['vllm']:8,.0f} {t['native']:8,.0f} {t['hf']:8,.0f} "
              f"      | {q['vllm']:11.2f} {q['hf']:9.2f} | {r['sync_s']:.3f} s, {100 * r['sync_share_of_step']:.1f}%")


if __name__ == "__main__":
    main()
