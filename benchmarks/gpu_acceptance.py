"""The first GPU run, in one command: gspo's GPU paths on one CUDA device, each printed as PASS / FAIL / SKIP.

    python benchmarks/gpu_acceptance.py [--out DIR] [--no-install] [--budget-s 540]

Made for one H100 / H200 with PyTorch, transformers, PEFT, safetensors and tokenizers installed, no vLLM,
no package registry and about 10 minutes: it installs gspo with ``pip install --no-deps -e .``, then runs
the commands of issue 22's table that one GPU can run, each in its own process with a time limit:

- ``train-tiny``: ``gspo train device=cuda`` on the embedded tiny model (held-out evaluation sampled at
  temperature 1 before training: G1; a training step: G2), bfloat16 training;
- ``eval``: ``gspo eval`` of the embedded model on CUDA (sampled, pass@k);
- ``agents``: the calculator agent task on the embedded tiny-calc model (multi-turn rollouts: G2);
- ``moe-r3-ckpt``: the embedded tiny MoE with Routing Replay R3, activation checkpointing and a
  checkpoint every step, then ``--resume`` (G8, G18);
- ``tier``: the single-GPU tests of ``tests/gpu`` (CUDA decode, chunked log-probabilities, bf16 mismatch);
- ``bf16-1.7B``: a Qwen3-1.7B-shaped model (its config, random weights, built here: nothing is downloaded)
  in bfloat16: sampling and training throughput lines (tokens/s) and peak memory.

vLLM (not installed there) and multi-GPU checks (NCCL, ``--nproc``) are printed as SKIP with the reason.
Without CUDA every check is SKIP and the script exits 0; otherwise it exits 1 if any check failed.
Outputs (each check's log, a summary JSON) go to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["steps=2", "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=16",
            "optim.minibatches=2", "eval.size=16", "log.progress=false", "log.tensorboard=false"]
ERROR_LINES = 12  # lines of a failed check's output shown under its FAIL line

# Qwen3-1.7B's shape (its config.json); weights random, made on the GPU.
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)

THROUGHPUT = r'''
import json, sys, time, torch, transformers
from gspo.logprobs import token_logprobs
from gspo.rollout.base import SamplingParams
from gspo.rollout.hf import HFEngine

config = transformers.Qwen3Config(**json.loads(sys.argv[1]))
torch.manual_seed(0)
with torch.device("cuda"):
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
params = sum(p.numel() for p in model.parameters())
batch, prompt, new = 64, 256, 256
prompts = torch.randint(10, 50000, (batch, prompt)).tolist()
engine = HFEngine(model, pad_token_id=0, eos_token_id=1)
engine.generate(prompts[:4], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
torch.cuda.synchronize(); start = time.perf_counter()
rollout = engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True), torch.Generator().manual_seed(0))
torch.cuda.synchronize(); sample_s = time.perf_counter() - start
sampled = int(rollout.lengths.sum())
model.train(); model.gradient_checkpointing_enable()
rows = rollout.input_ids[:16]; mask = rollout.attention_mask[:16]
torch.cuda.synchronize(); start = time.perf_counter()
with torch.autocast("cuda", dtype=torch.bfloat16):
    logprobs = token_logprobs(model, rows, mask, new)
logprobs.float().mean().backward()
torch.cuda.synchronize(); train_s = time.perf_counter() - start
trained = int(mask.sum())
print(f"THROUGHPUT {params / 1e9:.2f}B params bf16: sampling {sampled / sample_s:,.0f} tokens/s "
      f"({batch} x {new} new after {prompt}), forward+backward {trained / train_s:,.0f} tokens/s "
      f"(16 x {prompt + new}, checkpointed), peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
      f"{torch.cuda.get_device_name()}")
'''


@dataclass
class Check:
    name: str
    command: list[str]
    what: str  # the issue-22 finding(s) it would catch
    timeout_s: int = 150
    expect: str = ""  # a line the output must contain


def checks(out: Path, device: str = "cuda") -> list[Check]:
    """The checks, on ``device`` (``cpu``: the tiny commands only, to test the script itself)."""
    gspo = [sys.executable, "-m", "gspo"]
    moe_run = out / "moe-run"
    every = [
        Check("train-tiny", [*gspo, "train", "device=cuda", "optim.dtype=bfloat16", *TINY_RUN,
                             f"run_dir={out / 'tiny-run'}"], "G1 sampled evaluation, G2 device boundary, bf16"),
        Check("eval", [*gspo, "eval", "tiny-arith", "device=cuda", "eval.size=32", "samples=4", "k=1,4"],
              "G1 sampled evaluation on CUDA"),
        Check("agents", [*gspo, "train", "device=cuda", "model=tiny-calc", "data.task=calculator", *TINY_RUN,
                         f"run_dir={out / 'agent-run'}"], "G2 agent rollouts built on the CPU"),
        Check("moe-r3-ckpt", [sys.executable, "-c", _moe_then_resume(moe_run)],
              "G2 routing, G8 checkpointing + routing, checkpoint/resume", timeout_s=200),
        Check("tier", [sys.executable, "-m", "pytest", "-q", "-rs", "-s", str(ROOT / "tests" / "gpu"),
                       "-m", "gpu and not two_gpus and not needs_vllm"], "tests/gpu, single-GPU tests", timeout_s=240),
        Check("bf16-1.7B", [sys.executable, "-c", THROUGHPUT, json.dumps(QWEN3_1_7B)],
              "G12/G14 bf16 throughput at a real shape", timeout_s=240, expect="THROUGHPUT"),
    ]
    if device == "cuda":
        return every
    on = [Check(c.name, [a.replace("device=cuda", f"device={device}") for a in c.command], c.what, c.timeout_s * 4)
          for c in every if c.name not in ("tier", "bf16-1.7B")]
    return on

def _moe_then_resume(run: Path) -> str:
    """A MoE run with R3, activation checkpointing and a checkpoint every step, then --resume for one more."""
    first = ["train", "device=cuda", "model=tiny-moe", "moe.routing_replay=r3", "optim.gradient_checkpointing=true",
             "checkpoint.every=1", *TINY_RUN, f"run_dir={run}"]
    return ("import sys\nfrom gspo.cli import main\n"
            f"assert main({first!r}) == 0, 'first run failed'\n"
            f"assert main(['train', '--resume', {str(run)!r}, 'steps=3']) == 0, 'resume failed'\n")


def skipped(cuda: bool, gpus: int) -> list[tuple[str, str]]:
    """(check, reason) for what this machine cannot run."""
    out = []
    if importlib.util.find_spec("vllm") is None:
        reason = "vllm is not installed (pip install 'gspo[vllm]')"
        out += [("vllm-colocated", reason + ": G4/G6/G13 in-process engine"),
                ("vllm-server", reason + ": G5 NCCL weight transfer"), ("vllm-moe-push", reason + ": G7")]
    elif not cuda:
        out += [("vllm", "no CUDA")]
    if gpus < 2:
        out += [("multi-gpu", f"needs 2 GPUs, found {gpus}: G3 NCCL collectives, G9/G10 FSDP2, G16 DAPO gather")]
    return out


def run(check: Check, out: Path, env: dict) -> tuple[str, float, str]:
    """(PASS / FAIL, seconds, error text) of one check; its whole output goes to out/<name>.log."""
    start = time.perf_counter()
    try:
        done = subprocess.run(check.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=check.timeout_s)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {check.timeout_s} s", -1
        output = output if isinstance(output, str) else output.decode(errors="replace")
    seconds = time.perf_counter() - start
    (out / f"{check.name}.log").write_text(output)
    ok = code == 0 and (not check.expect or check.expect in output)
    detail = "\n".join(line for line in output.splitlines() if line.startswith(("THROUGHPUT", "[gpu]")))
    if not ok:
        detail = "\n".join(output.strip().splitlines()[-ERROR_LINES:])
    return ("PASS" if ok else "FAIL"), seconds, detail


def install(env: dict) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-e", str(ROOT)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    return ("PASS" if done.returncode == 0 else "FAIL"), (done.stdout + done.stderr).strip().splitlines()[-1:][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where logs and summary.json go (default: a temp dir)")
    parser.add_argument("--no-install", action="store_true", help="skip `pip install --no-deps -e .`")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting checks after this long")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: run the tiny commands on the CPU (tests the script; no install)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gspo-gpu-acceptance-"))
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available() or args.device == "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"{torch.cuda.get_device_name()} x{gpus}" if torch.cuda.is_available() else "no CUDA"
    print(f"gspo GPU acceptance: torch {torch.__version__}, CUDA {torch.version.cuda}, {device}; logs in {out}",
          flush=True)
    results: dict[str, dict] = {}

    def report(name: str, status: str, seconds: float = 0.0, detail: str = "") -> None:
        results[name] = {"status": status, "seconds": round(seconds, 1), "detail": detail}
        print(f"{status:4} {name:16} {seconds:6.1f} s" + (f"  {detail.splitlines()[0]}" if detail else ""), flush=True)
        for line in detail.splitlines()[1:]:
            print(f"     {line}", flush=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    started = time.perf_counter()
    if not cuda:
        report("install", "SKIP", detail="no CUDA: nothing to install for")
    elif args.no_install or args.device == "cpu":
        report("install", "SKIP", detail="--no-install")
    else:
        status, detail = install(env)
        report("install", status, time.perf_counter() - started, detail)
    for check in checks(out, args.device):
        if not cuda:
            report(check.name, "SKIP", detail=f"no CUDA ({check.what})")
        elif time.perf_counter() - started > args.budget_s:
            report(check.name, "SKIP", detail=f"time budget of {args.budget_s:.0f} s spent")
        else:
            report(check.name, *run(check, out, env))
    for name, reason in skipped(cuda, gpus):
        report(name, "SKIP", detail=reason)
    (out / "summary.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                  "results": results}, indent=2))
    failed = [name for name, r in results.items() if r["status"] == "FAIL"]
    print(f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else "") +
          f"; {time.perf_counter() - started:.0f} s in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
