"""Peak memory of the log-probability + loss step: chunked ``token_logprobs`` vs full logits.

Setting: vocabulary 151,936 (Qwen's), batch 8, sequence length 1,024 (64 prompt + 960 completion
tokens), a tiny decoder body (hidden 64, 1 layer) so that the LM head and its logits dominate; the full
float32 logits alone are 8 x 1,024 x 151,936 x 4 B = 5 GB. Each variant runs forward + backward of a
token-level loss in its own subprocess; the parent reads each child's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), prints both and their ratio, and checks that the two
variants agree in log-probabilities and gradients. Target: chunked peak <= 1/8 of full.

    PYTHONPATH=src python benchmarks/bench_logprobs_memory.py [--chunk-size 512]

``--head-time``: seconds of the chunked LM-head function alone (forward under autocast, backward after
it, as the update runs them) at a real head shape, 4,096 tokens x hidden 1,024 x vocabulary 151,936
(Qwen3-0.6B's), float32 master weight, in ``--dtype`` (bfloat16 autocast by default).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_logprobs_memory.py --head-time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

VOCAB = 151_936  # Qwen2.5 / Qwen3 vocabulary size
BATCH, PROMPT_LEN, COMPLETION_LEN = 8, 64, 960  # 1,024 tokens per sequence
TEMPERATURE = 0.9  # != 1 so the temperature scaling is part of what is measured
TARGET_RATIO = 1 / 8
LOGPROB_ATOL = 1e-4  # float32, identical math in a different order
GRAD_RTOL = 1e-3


def build_inputs():
    """Tiny large-vocabulary Qwen3 and a fixed batch with left-padded prompts and ragged completions."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (BATCH, PROMPT_LEN + COMPLETION_LEN), generator=gen)  # (B, L)
    mask = torch.ones_like(input_ids, dtype=torch.bool)  # (B, L)
    for row in range(BATCH):
        mask[row, : row * 4] = False  # left padding of the prompt
        mask[row, PROMPT_LEN + COMPLETION_LEN - row * 32 :] = False  # right padding of the completion
    weights = torch.randn(BATCH, COMPLETION_LEN, generator=gen)  # (B, T) stand-in for advantages
    return model, input_ids, mask, weights


def run_variant(variant: str, chunk_size: int, out_path: str) -> None:
    """Child process: one forward + backward, then write peak RSS and the results to ``out_path``."""
    from gspo.logprobs import token_logprobs, token_logprobs_reference

    model, input_ids, mask, weights = build_inputs()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "chunked":
        logprobs = token_logprobs(
            model, input_ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, chunk_size=chunk_size
        )
    else:
        logprobs = token_logprobs_reference(model, input_ids, mask, COMPLETION_LEN, temperature=TEMPERATURE)
    completion_mask = mask[:, -COMPLETION_LEN:]  # (B, T)
    loss = -(logprobs * weights * completion_mask).sum() / completion_mask.sum()
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(
        {
            "logprobs": logprobs.detach(),
            "grad_lm_head": model.lm_head.weight.grad,
            "grad_embed": model.model.embed_tokens.weight.grad,
            "stats": {"peak_kb": peak_kb, "baseline_kb": baseline_kb, "seconds": seconds},
        },
        out_path,
    )


HEAD_TOKENS, HEAD_HIDDEN = 4096, 1024  # --head-time: Qwen3-0.6B's hidden size


def time_head(chunk_size: int, dtype: str) -> None:
    """Forward and backward seconds of the chunked LM head at (HEAD_TOKENS x HEAD_HIDDEN x VOCAB)."""
    from gspo.logprobs import _ChunkedLinearLogprobs

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(VOCAB, HEAD_HIDDEN, generator=gen) * 0.02).requires_grad_()  # (V, H) fp32 master
    autocast = getattr(torch, dtype) if dtype != "float32" else None
    for tokens in (64, HEAD_TOKENS):  # a small warm-up first (kernel selection, allocator)
        hidden = torch.randn(tokens, HEAD_HIDDEN, generator=gen).requires_grad_()  # (N, H) fp32, a norm's output
        targets = torch.randint(0, VOCAB, (tokens,), generator=gen)  # (N,)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = _ChunkedLinearLogprobs.apply(hidden, weight, None, targets, TEMPERATURE, chunk_size)  # (N,)
        forward = time.perf_counter() - start
        out.sum().backward()
        backward = time.perf_counter() - start - forward
    flop = 2 * HEAD_TOKENS * HEAD_HIDDEN * VOCAB  # one GEMM of the head
    print(f"LM head {HEAD_TOKENS} x {HEAD_HIDDEN} x {VOCAB}, {dtype}, chunk {chunk_size}, "
          f"{torch.get_num_threads()} thread(s): forward {forward:.1f} s, backward {backward:.1f} s, "
          f"total {forward + backward:.1f} s ({4 * flop / (forward + backward) / 1e9:.0f} GFLOP/s over 4 GEMMs)")


def spawn(variant: str, chunk_size: int, tmpdir: str) -> dict:
    """Run one variant in a fresh interpreter and load what it saved."""
    out_path = os.path.join(tmpdir, f"{variant}.pt")
    cmd = [sys.executable, __file__, "--child", variant, "--chunk-size", str(chunk_size), "--out", out_path]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return torch.load(out_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--child", choices=["chunked", "full"])
    parser.add_argument("--out")
    parser.add_argument("--head-time", action="store_true", help="time the LM head alone at a real shape")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="with --head-time")
    args = parser.parse_args()
    if args.head_time:
        time_head(args.chunk_size, args.dtype)
        return
    if args.child:
        run_variant(args.child, args.chunk_size, args.out)
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        results = {variant: spawn(variant, args.chunk_size, tmpdir) for variant in ("chunked", "full")}
    for variant, result in results.items():
        stats = result["stats"]
        peak_gib, step_gib = stats["peak_kb"] / 2**20, (stats["peak_kb"] - stats["baseline_kb"]) / 2**20
        print(
            f"{variant:8s} peak RSS {peak_gib:6.2f} GiB (the step adds {step_gib:6.2f} GiB to model + inputs), "
            f"forward + backward {stats['seconds']:.1f} s"
        )
    chunked, full = results["chunked"], results["full"]
    ratio = chunked["stats"]["peak_kb"] / full["stats"]["peak_kb"]
    print(f"peak ratio chunked / full = {ratio:.3f} (target <= {TARGET_RATIO:.3f})")
    logprob_err = (chunked["logprobs"] - full["logprobs"]).abs().max().item()
    grad_errs = {
        name: ((chunked[name] - full[name]).norm() / full[name].norm()).item()
        for name in ("grad_lm_head", "grad_embed")
    }
    print(f"max |logprobs diff| = {logprob_err:.2e}; relative grad diff = {json.dumps(grad_errs)}")
    assert logprob_err <= LOGPROB_ATOL, "log-probabilities disagree"
    assert all(err <= GRAD_RTOL for err in grad_errs.values()), "gradients disagree"
    assert ratio <= TARGET_RATIO, "chunked peak memory above target"


if __name__ == "__main__":
    main()
