"""Measured peak RSS of gspo training steps against :mod:`gspo.memory`'s estimate.

A randomly initialised Qwen3 with the real 151,936-token vocabulary (tied embeddings) and the embedded
character tokenizer, the arithmetic task, 4 prompts x 4 responses of exactly ``--new-tokens`` tokens
(``rollout.ignore_eos``), 4 minibatches, two rollout batches; each case runs alone in a fresh process
(``resource.getrusage`` ``ru_maxrss`` is the process's own peak). Results go to
``benchmarks/results/memory_cpu.json``; tests/unit/test_memory.py pins the estimate against them.

    PYTHONPATH=src python benchmarks/measure_memory.py --new-tokens 128 512 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory_cpu.json"
# ~103M parameters, 78M of them the tied 151,936 x 512 embedding (the real Qwen3 vocabulary)
SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536)
VOCAB = 151_936


def build(directory: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gspo.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=SHAPE["hidden_size"], intermediate_size=SHAPE["intermediate_size"],
                         num_hidden_layers=SHAPE["num_layers"], num_attention_heads=SHAPE["num_heads"],
                         num_key_value_heads=SHAPE["num_kv_heads"], head_dim=SHAPE["hidden_size"] // SHAPE["num_heads"],
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def overrides(model_dir: str, new_tokens: int, dtype: str, extra: list[str]) -> list[str]:
    return [f"model={model_dir}", "steps=2", "seed=0", "log.tensorboard=false", "device=cpu", "cpu_threads=1",
            "rollout.prompts_per_step=4", "rollout.group_size=4", f"rollout.max_new_tokens={new_tokens}",
            "rollout.ignore_eos=true", "optim.minibatches=4", f"optim.dtype={dtype}", *extra]


def worker(model_dir: str, new_tokens: int, dtype: str, extra: list[str]) -> None:
    """One case: build the trainer, two steps; print the peak RSS, the prompt width and the estimate."""
    from gspo import memory
    from gspo.config.load import load_config
    from gspo.trainer.trainer import Trainer

    config = load_config(None, overrides(model_dir, new_tokens, dtype, extra))
    trainer = Trainer.from_config(config, run_dir=None)
    prompt_tokens = 0
    for _ in range(2):
        metrics = trainer.train_step()
        prompt_tokens = max(prompt_tokens, int(metrics["tokens/trained"] / 16 - new_tokens + 0.999))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    run = memory.RunShape.from_config(config, trainer.parts.precision, prompt_tokens=prompt_tokens)
    shape = memory.ModelShape.from_dir(model_dir)
    est = memory.estimate(shape, run)
    case = {"new_tokens": new_tokens, "dtype": dtype, "extra": extra, "prompt_tokens": prompt_tokens,
            "peak_rss_bytes": peak, "estimate_bytes": est.total, "estimate": est.describe()}
    if trainer.parts.pipeline is not None:  # rollout.max_staleness >= 1: the sampler process's own peak too
        sampler = memory.sampler_estimate(shape, run)
        case.update(sampler_peak_rss_bytes=peak_rss(trainer.parts.pipeline.engine.pid),
                    sampler_estimate_bytes=sampler.total, sampler_estimate=sampler.describe())
        trainer.parts.pipeline.close()
    print(json.dumps(case))


def peak_rss(pid: int) -> int:
    """Another process's peak resident set (Linux: ``VmHWM`` in /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--extra", nargs="*", default=[], help="more config overrides")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (cases merge into it)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "NEW_TOKENS"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.dtype, args.extra)
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {"cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        for n in args.new_tokens:
            cmd = [sys.executable, __file__, "--worker", tmp, str(n), "--dtype", args.dtype, "--extra", *args.extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            case = json.loads(out.stdout.strip().splitlines()[-1])
            case["shape"] = {**SHAPE, "vocab": VOCAB}
            print(json.dumps(case), flush=True)
            results["cases"] = [c for c in results["cases"] if (c["new_tokens"], c["dtype"], c.get("extra", []))
                                != (n, args.dtype, args.extra)] + [case]
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared; RSS is per process)"
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
