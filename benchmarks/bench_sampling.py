"""Micro-benchmark: HFEngine's decode loop vs ``model.generate`` on a ~1M-parameter Qwen3.

128 sequences x 64 new tokens, ``ignore_eos`` (fixed length), float32 policy; the engine is run sharing
the float32 module with gspo's native decode step (the default) and with transformers' forward
(``decoder="hf"``, StaticCache and, for comparison, DynamicCache), and with its own bfloat16 copy;
``model.generate`` on the float32 model and on a bfloat16 copy. Variants run round-robin
(the machine may be shared); prints generated tokens per second, prefill included, by wall clock
(best and median) and by process CPU time.

    PYTHONPATH=src python benchmarks/bench_sampling.py [--repeats 5] [--threads 2] [--num-sequences 128]

``--compaction``: the cost of sampling when completion lengths differ. A randomly initialised ~42M-parameter
Qwen3 with the real 151,936-token vocabulary (tied), 4 prompts x 4 responses, up to 256 new tokens, EOS made
likely enough (a head bias, :data:`EOS_PROBABILITY` per step) that lengths spread from a few tokens to the
budget; the engine with finished rows leaving the decode batch (the default) against the same engine
keeping them (``engine.compact = False``), same row seeds, interleaved; prints seconds per rollout and
the ratio (identical tokens are asserted).

    PYTHONPATH=src python benchmarks/bench_sampling.py --compaction [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable

import torch
import transformers

from gspo.rollout.base import SamplingParams
from gspo.rollout.hf import HFEngine

NUM_SEQUENCES = 128
NEW_TOKENS = 64
PROMPT_LENGTHS = (8, 16)  # prompts alternate between two lengths so left padding is exercised
PAD_ID, EOS_ID = 0, 1


def tiny_qwen3() -> torch.nn.Module:
    """~1M-parameter Qwen3 (vocab 32, hidden 128, 4 layers), random weights."""
    config = transformers.Qwen3Config(
        vocab_size=32,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


def make_prompts(num_sequences: int) -> list[list[int]]:
    """Prompts of alternating lengths, tokens drawn from the non-special ids."""
    gen = torch.Generator().manual_seed(0)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(num_sequences)]
    return [torch.randint(2, 32, (n,), generator=gen).tolist() for n in lengths]


def engine_runner(engine: HFEngine, prompts) -> Callable[[int], None]:
    """One fixed-length ``engine.generate`` call per invocation (the argument seeds the generator)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True)

    def run(seed: int) -> None:
        rollout = engine.generate(prompts, params, torch.Generator().manual_seed(seed))
        assert rollout.completion_ids.shape == (len(prompts), NEW_TOKENS)

    return run


def generate_runner(model: torch.nn.Module, prompts) -> Callable[[int], None]:
    """One ``model.generate`` call on the same left-padded batch, forced to NEW_TOKENS tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])  # (B, P)
    kwargs = dict(
        attention_mask=ids.ne(PAD_ID).long(),  # (B, P) prompts never contain PAD_ID
        do_sample=True,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        top_k=0,
        top_p=1.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )

    def run(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        assert out.shape == (len(prompts), width + NEW_TOKENS)

    return run


EOS_PROBABILITY = 1 / 64  # per step, about: geometric lengths with mean ~64, ~2% reach the 256-token budget
REAL_VOCAB = 151_936  # Qwen2/Qwen3 tokenizer


def vocab_qwen3() -> torch.nn.Module:
    """~42M-parameter Qwen3 (tied 151,936 vocabulary, hidden 256, 4 layers), random weights, EOS likely."""
    config = transformers.Qwen3Config(
        vocab_size=REAL_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    head = torch.nn.Linear(config.hidden_size, REAL_VOCAB, bias=True)
    head.weight = model.model.embed_tokens.weight  # still tied
    with torch.no_grad():  # random logits are near uniform: odds p / (1 - p) against the V - 1 others
        head.bias.zero_()
        head.bias[EOS_ID] = math.log(EOS_PROBABILITY / (1 - EOS_PROBABILITY) * (REAL_VOCAB - 1))
    model.lm_head = head
    return model


def compaction_main(args) -> None:
    """Compaction on vs off, interleaved, on :func:`vocab_qwen3` (see the module docstring)."""
    dtype = getattr(torch, args.dtype)
    model = vocab_qwen3()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 1000, (n,), generator=gen).tolist() for n in (12, 16, 20, 24)]
    prompts = [p for p in prompts for _ in range(4)]  # 4 groups of 4 responses
    params = SamplingParams(max_new_tokens=256, temperature=1.0)
    engine = HFEngine(model, pad_token_id=PAD_ID, eos_token_id=EOS_ID, dtype=dtype)
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}  # this process's CPU time: less sensitive to load
    for repeat in range(args.repeats + 1):  # repeat 0 warms up; each repeat draws new row seeds
        seeds = [1000 * repeat + row for row in range(len(prompts))]
        outs = {}
        for compact in (True, False) if repeat % 2 == 0 else (False, True):
            engine.compact = compact
            start, start_cpu = time.perf_counter(), time.process_time()
            outs[compact] = engine.generate(prompts, params, row_seeds=seeds)
            if repeat > 0:
                wall[compact].append(time.perf_counter() - start)
                cpu[compact].append(time.process_time() - start_cpu)
        assert torch.equal(outs[True].completion_ids, outs[False].completion_ids)
        lengths = outs[True].lengths
        row_steps = len(prompts) * int(lengths.max())  # what a batch that no row leaves decodes
        times = (f"; wall on {wall[True][-1]:.2f} s, off {wall[False][-1]:.2f} s, "
                 f"cpu on {cpu[True][-1]:.2f} s, off {cpu[False][-1]:.2f} s") if repeat else ""
        print(f"repeat {repeat}: lengths min {int(lengths.min())} median {int(lengths.median())} "
              f"max {int(lengths.max())}, {int(lengths.sum())} tokens = {int(lengths.sum()) / row_steps:.0%} "
              f"of {row_steps} row-steps{times}")
    params_count = sum(p.numel() for p in model.parameters())
    print(f"params={params_count:,} dtype={args.dtype} threads={args.threads} rows=16 max_new_tokens=256")
    for clock, times in (("wall", wall), ("cpu", cpu)):
        on, off = statistics.median(times[True]), statistics.median(times[False])
        ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(times[True], times[False]))
        print(f"{clock}: median s/rollout compaction on {on:.2f}, off {off:.2f}; off / on {off / on:.2f}x "
              f"(per repeat {ratios})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--num-sequences", type=int, default=NUM_SEQUENCES, help="1 measures per-token overhead")
    parser.add_argument("--compaction", action="store_true", help="compaction on vs off at a 151,936 vocabulary")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="with --compaction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compaction:
        return compaction_main(args)
    model, prompts = tiny_qwen3(), make_prompts(args.num_sequences)
    dynamic = HFEngine(model, pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder="hf")
    dynamic.static_cache = False  # the DynamicCache alternative, for comparison
    runners = {
        "HFEngine float32 native": engine_runner(HFEngine(model, pad_token_id=PAD_ID, eos_token_id=EOS_ID), prompts),
        "HFEngine float32 hf": engine_runner(
            HFEngine(model, pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder="hf"), prompts),
        "HFEngine float32 hf Dynamic": engine_runner(dynamic, prompts),
        "model.generate float32": generate_runner(model, prompts),
        "HFEngine bfloat16 native": engine_runner(
            HFEngine(model, pad_token_id=PAD_ID, eos_token_id=EOS_ID, dtype=torch.bfloat16), prompts
        ),
        "model.generate bfloat16": generate_runner(copy.deepcopy(model).to(torch.bfloat16), prompts),
    }
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats + 1):  # round-robin so that machine load hits every variant alike
        for name, run in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(repeat)
            if repeat > 0:  # repeat 0 is the warm-up
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    tokens = len(prompts) * NEW_TOKENS
    print(
        f"params={sum(p.numel() for p in model.parameters()):,} threads={args.threads} "
        f"batch={len(prompts)} new_tokens={NEW_TOKENS} repeats={args.repeats}"
    )
    print("tok/s by wall clock (best, median) and by this process's CPU time (best; with --threads 1 the")
    print("CPU-time figure is the least sensitive to other processes on a shared machine)")
    for name in runners:
        best, median = tokens / min(wall[name]), tokens / statistics.median(wall[name])
        print(f"{name:30s} wall {best:8.0f} {median:8.0f}   cpu {tokens / min(cpu[name]):8.0f}")


if __name__ == "__main__":
    main()
