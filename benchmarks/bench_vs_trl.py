"""gspo vs TRL's ``GRPOTrainer`` (configured for GSPO) on one machine: time, throughput, memory, roofline.

The same workload goes through both: a locally built Qwen3 with the embedded model's character tokenizer
(saved to a temporary directory that both load), the arithmetic task's prompts, 16 prompts x 8 responses
per rollout batch, 64 new tokens, 4 minibatches (one optimizer step each), float32 master weights.

- gspo: :class:`gspo.trainer.trainer.Trainer`, GSPO defaults (clip 3e-4 / 4e-4; native decode step; old
  log-probabilities from the sampler, ``loss.old_logprobs=auto``), plus variants (``GSPO_VARIANTS``): with the
  old-log-probability pass TRL runs (``-recompute``), with transformers' forward for sampling as well
  (``-hf``, gspo before its native decoder), memory-matched to TRL (``-lean``: activation checkpointing
  and micro-batches of 16), bfloat16 (``rollout.engine_dtype=bfloat16`` + ``optim.dtype=bfloat16``).
- TRL: ``GRPOTrainer`` with ``importance_sampling_level="sequence"``, ``loss_type="grpo"``, epsilon 3e-4 /
  4e-4, ``beta=0``, ``steps_per_generation=4``, ``num_generations=8``, ``per_device_train_batch_size=32``,
  no vLLM, float32 (``bf16=False``), its default fused AdamW.

``--fixed-length`` removes early EOS on both sides (gspo ``rollout.ignore_eos=true``, TRL
``generation_kwargs={"min_new_tokens": 64}``) so both generate exactly 128 x 64 tokens per rollout batch.

Each variant runs in its own long-lived worker process (so its peak RSS, ``ru_maxrss``, is its own),
driven step by step over a pipe: one "step" is one rollout batch (sampling, scoring, old log-probabilities
and the 4 optimizer steps). The TRL worker pauses its ``train()`` loop in a callback every 4 optimizer
steps. Rounds interleave the variants (the order rotates every round) so machine load hits all alike;
a GEMM worker measures the float32 and bfloat16 matmul peak in every round too. After the warm-up
round(s), medians are reported with the load average. The roofline line divides the model FLOPs of a
rollout batch (sampling 2·N·tokens, the old-log-probability pass 2·N·tokens, training forward + backward
6·N·tokens, plus causal attention) by the measured time; the workload's FLOPs are the same for every
variant (a variant that skips the old-log-probability pass is credited with it, so its rate reads as the
rate at which it gets the job done, not the rate its kernels ran at).

    PYTHONPATH=src python benchmarks/bench_vs_trl.py --size tiny|small|both --rounds 5 --fixed-length

Threads: every worker uses ``--threads`` (default: all cores; the ``-1t`` variants one) and
``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``), gspo through ``cpu_threads`` so that its size-based
default (one thread below 50M parameters) does not make the comparison uneven. On a shared,
oversubscribed machine libgomp's default spin-waiting made every PyTorch op wait for a descheduled
sibling thread (measured: a tiny-model step 72 s with 2 spinning threads, 7 s with 1 thread, 6.4 s
with 2 passive threads); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

PROMPTS_PER_BATCH = 16
GROUP_SIZE = 8
NEW_TOKENS = 64
MINIBATCHES = 4
LR = 1e-4
SEED = 0
MAX_POSITIONS = 128  # the embedded model has 64 positions; 64 new tokens plus a prompt need more
SIZES = {  # keyword arguments of gspo.models.tiny.build_tiny_qwen3
    "tiny": {},  # the embedded default: hidden 128, 4 layers, ~1M parameters
    "small": {"hidden_size": 384, "num_layers": 8, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1536},
}
# gspo variants: config overrides on top of the shared workload.
GSPO_VARIANTS = {
    # gspo's defaults: native decode step, old log-probabilities from the sampler (loss.old_logprobs=auto)
    "gspo-fp32": [],
    # the same with the old-log-probability pass that TRL runs (steps_per_generation > 1 makes TRL run it)
    "gspo-fp32-recompute": ["loss.old_logprobs=recompute"],
    # gspo before the native decoder: transformers' forward for sampling, and the recompute pass
    "gspo-fp32-hf": ["rollout.decoder=hf", "loss.old_logprobs=recompute"],
    "gspo-bf16": ["rollout.engine_dtype=bfloat16", "optim.dtype=bfloat16"],  # bf16 sampler copy + autocast training
    "gspo-fp32-mb16": ["optim.micro_batch_size=16"],  # gradient accumulation: half the activation memory
    "gspo-fp32-mb8": ["optim.micro_batch_size=8"],  # a quarter of the activation memory, no recomputation
    "gspo-fp32-gc": ["optim.gradient_checkpointing=true"],  # TRL's default memory trade
    # memory-matched to TRL's defaults: activation checkpointing and micro-batches of 16
    "gspo-fp32-lean": ["optim.gradient_checkpointing=true", "optim.micro_batch_size=16"],
    "gspo-fp32-1t": [],  # one thread (gspo's cpu_threads=0 default below 50M parameters)
}
# TRL variants: GRPOConfig fields on top of the shared workload. TRL's GRPOConfig turns gradient
# checkpointing on by default (recompute activations in the backward: less memory, one more forward).
TRL_VARIANTS = {"trl-fp32": {"gradient_checkpointing": True}, "trl-fp32-nogc": {"gradient_checkpointing": False},
                "trl-fp32-1t": {"gradient_checkpointing": True},
                "trl-bf16": {"gradient_checkpointing": True, "bf16": True}}  # bf16 autocast, fp32 master
VARIANT_THREADS = {"gspo-fp32-1t": 1, "trl-fp32-1t": 1}  # others use --threads
VARIANTS = ("gspo-fp32", "gspo-fp32-recompute", "gspo-fp32-hf", "gspo-fp32-lean", "trl-fp32", "trl-fp32-nogc")
GEMM_SIZE = 1024  # square matmul for the peak measurement
GEMM_REPEATS = 8


# ---------------------------------------------------------------------------------------------------
# Worker side: one process per variant, commands on stdin, JSON replies on the original stdout.
# ---------------------------------------------------------------------------------------------------
class Channel:
    """Replies go to the original stdout; anything libraries print goes to stderr instead."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    @staticmethod
    def receive() -> str:
        line = sys.stdin.readline()
        return json.loads(line)["cmd"] if line else "quit"


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def gspo_worker(args, channel: Channel) -> None:
    """Drive :class:`Trainer.train_step`, one rollout batch per command."""
    import torch

    from gspo.config.load import load_config
    from gspo.trainer.trainer import Trainer

    overrides = [f"model={args.model_dir}", "steps=100000", f"seed={SEED}", "log.tensorboard=false",
                 f"rollout.prompts_per_step={PROMPTS_PER_BATCH}", f"rollout.group_size={GROUP_SIZE}",
                 f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.ignore_eos={str(args.fixed_length).lower()}",
                 f"optim.minibatches={MINIBATCHES}", f"optim.lr={LR}", "device=cpu",
                 f"cpu_threads={args.threads}"]  # the same thread count as TRL, not gspo's size-based default
    overrides += GSPO_VARIANTS[args.variant]
    trainer = Trainer.from_config(load_config(None, overrides), run_dir=None)  # run_dir None: no files written
    channel.send({"ready": True, "rss_mb": rss_mb(), "peak_mb": peak_rss_mb(), "threads": torch.get_num_threads()})
    while channel.receive() == "step":
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = trainer.train_step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        channel.send({
            "wall_s": wall, "cpu_s": cpu, "peak_mb": peak_rss_mb(), "rss_mb": rss_mb(),
            "gen_tokens": metrics["tokens/generated"], "seq_tokens": metrics["tokens/trained"],
            "sample_s": metrics["sample/prefill_s"] + metrics["sample/decode_s"],
            "phases": {k: metrics[k] for k in ("sample/prefill_s", "sample/decode_s", "time/score_s",
                                               "time/rollout_s", "time/logprobs_s", "time/update_s")},
            # precision diagnostics: sampler vs trainer log-probabilities, and the sequence ratios of the
            # first (on-policy) minibatch and of all four (the later ones include the policy's own movement)
            "quality": {"mismatch/token_abs_mean": metrics["mismatch/token_abs_mean"],
                        "mismatch/seq_std": metrics["mismatch/seq_std"],
                        "onpolicy/outside_band_frac": trainer.last_updates[0]["ratio/outside_band_frac"],
                        "onpolicy/logratio_seq_std": trainer.last_updates[0]["logratio/seq_std"],
                        "all/outside_band_frac": metrics["ratio/outside_band_frac"]},
        })
    channel.send({"peak_mb": peak_rss_mb()})


def trl_worker(args, channel: Channel) -> None:
    """Run ``GRPOTrainer.train()``, pausing in a callback after every rollout batch's 4 optimizer steps.

    The workload is this script's constants unless ``args`` names it (``prompts``, ``group_size``,
    ``new_tokens``; benchmarks/bench_real_shape.py does); ``args.warmup_tokens`` (if set) makes the warm-up
    batches that short (generation_config changed between batches, restored for the measured ones)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gspo.tasks.arithmetic import ArithmeticTask, exact_answer_reward

    def exact_answer(prompts, completions, answer, **_):
        return [exact_answer_reward(p, c, answer=a) for p, c, a in zip(prompts, completions, answer)]

    prompts, group = getattr(args, "prompts", PROMPTS_PER_BATCH), getattr(args, "group_size", GROUP_SIZE)
    new_tokens, warmup_tokens = getattr(args, "new_tokens", NEW_TOKENS), getattr(args, "warmup_tokens", 0)
    batches = args.rounds + args.warmup + 2
    rows = ArithmeticTask(seed=SEED).train_rows(prompts * batches)  # gspo reads the same stream
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=MINIBATCHES, use_cpu=True, seed=SEED,
        per_device_train_batch_size=prompts * group // MINIBATCHES, gradient_accumulation_steps=1,
        steps_per_generation=MINIBATCHES, num_generations=group, num_iterations=1,
        max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": new_tokens} if args.fixed_length else None,
        importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4, beta=0.0,
        scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=MINIBATCHES * batches, shuffle_dataset=False, use_vllm=False,
        **{"bf16": False, **TRL_VARIANTS[args.variant]},
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_answer], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    timers = {"generate": 0.0, "generate_and_score": 0.0}
    tokens = {"gen": 0, "seq": 0, "lengths": []}

    def generate_tokens(n: int) -> None:  # this many new tokens from the next batch on
        fixed = {"min_new_tokens": n} if args.fixed_length else {}
        trainer.generation_kwargs.update(max_new_tokens=n, **fixed)  # what TRL passes to generate()
        trainer.generation_config.update(max_new_tokens=n, **fixed)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            timers[name] += time.perf_counter() - start
            if name == "generate_and_score":  # real tokens of the batch, as TRL masks them
                tokens["gen"] += int(out["completion_mask"].sum())
                tokens["seq"] += int(out["completion_mask"].sum() + out["prompt_mask"].sum())
                tokens["lengths"] += out["completion_mask"].sum(1).tolist()
            return out
        return wrapper

    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    clock = {}

    def start_round():
        timers.update(generate=0.0, generate_and_score=0.0)
        tokens.update(gen=0, seq=0, lengths=[])
        clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()

    class Pause(TrainerCallback):
        def on_step_end(self, _args, state, control, **_):
            if state.global_step % MINIBATCHES:
                return
            wall, cpu = time.perf_counter() - clock["wall"], time.process_time() - clock["cpu"]
            channel.send({
                "wall_s": wall, "cpu_s": cpu, "peak_mb": peak_rss_mb(), "rss_mb": rss_mb(),
                "gen_tokens": tokens["gen"], "seq_tokens": tokens["seq"], "sample_s": timers["generate"],
                "lengths": tokens["lengths"],
                "phases": {"generate_s": timers["generate"],
                           "score_and_logprobs_s": timers["generate_and_score"] - timers["generate"],
                           "update_s": wall - timers["generate_and_score"]},
            })
            if state.global_step // MINIBATCHES == args.warmup and warmup_tokens:
                generate_tokens(new_tokens)  # the measured batches: full length
            if channel.receive() == "step":
                start_round()
            else:
                control.should_training_stop = True

    trainer.add_callback(Pause())
    channel.send({"ready": True, "rss_mb": rss_mb(), "peak_mb": peak_rss_mb(), "threads": torch.get_num_threads()})
    if args.warmup and warmup_tokens:
        generate_tokens(warmup_tokens)
    if channel.receive() == "step":
        start_round()
        trainer.train()
    channel.send({"peak_mb": peak_rss_mb()})


def gemm_gflops(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> dict[str, float]:
    """Best-of-``repeats`` GFLOP/s of a square float32 and bfloat16 matmul on this process's threads."""
    import torch

    result = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        result[name] = 2 * size**3 / best / 1e9
    return result


def gemm_worker(args, channel: Channel) -> None:
    """:func:`gemm_gflops`, once per command."""
    import torch

    channel.send({"ready": True, "rss_mb": rss_mb(), "peak_mb": peak_rss_mb(), "threads": torch.get_num_threads()})
    while channel.receive() == "step":
        channel.send({"gflops": gemm_gflops(), "peak_mb": peak_rss_mb()})
    channel.send({"peak_mb": peak_rss_mb()})


def worker_main(args) -> None:
    import torch

    args.threads = VARIANT_THREADS.get(args.variant, args.threads)
    torch.set_num_threads(args.threads)
    channel = Channel()
    {"gspo": gspo_worker, "trl": trl_worker, "gemm": gemm_worker}[args.variant.split("-")[0]](args, channel)


# ---------------------------------------------------------------------------------------------------
# Parent side: build the models, start the workers, interleave the rounds, summarise.
# ---------------------------------------------------------------------------------------------------
class Worker:
    """One variant's worker process: ``script --worker VARIANT ...`` (this script unless named), plus ``extra`` arguments."""

    def __init__(self, variant: str, model_dir: str, args, log_dir: Path, *, script: str = __file__,
                 extra: tuple[str, ...] = (), python: str = sys.executable, env: dict | None = None) -> None:
        self.variant = variant
        env = env or {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_WAIT_POLICY": args.omp_wait_policy,
               "OMP_NUM_THREADS": str(VARIANT_THREADS.get(variant, args.threads)),
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
        self.log = open(log_dir / f"{variant}.log", "w")
        cmd = [python, script, "--worker", variant, "--model-dir", model_dir, "--threads", str(args.threads),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup)] + (["--fixed-length"] * args.fixed_length)
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        self.ready = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"worker {self.variant} died; see {self.log.name}")
        return json.loads(line)

    def request(self, cmd: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        final = self.request("quit")
        self.proc.wait(timeout=600)
        self.log.close()
        return final


def build_model(size: str, directory: Path) -> dict:
    """Save the size's Qwen3 and the char tokenizer to ``directory``; return its shape for the roofline."""
    from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3(tokenizer, max_position_embeddings=MAX_POSITIONS, seed=SEED, **SIZES[size])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    c = model.config
    # Matmul parameters: every Linear, the tied LM head included (it is a vocab x hidden matmul per token).
    matmul = sum(m.weight.numel() for m in model.modules() if m.__class__.__name__ == "Linear")
    if getattr(c, "tie_word_embeddings", False):
        matmul += model.get_input_embeddings().weight.numel()
    return {"params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul,
            "layers": c.num_hidden_layers, "attn_width": c.num_attention_heads * c.head_dim,
            "hidden": c.hidden_size, "vocab": c.vocab_size}


def model_flops(shape: dict, gen_tokens: float, seq_tokens: float, seq_len: float, batch: int) -> float:
    """Model FLOPs of one rollout batch: sample (2N per generated token + prompt prefill), one no-grad
    log-probability pass (2N per token) and training forward + backward (6N per token), plus causal
    attention (2 * width * L^2 per layer and sequence forward: QK^T and AV over half the square)."""
    n = shape["matmul_params"]
    attention = 2 * shape["attn_width"] * seq_len**2 * shape["layers"] * batch  # one forward over the batch
    return (2 * n * seq_tokens + attention) + (2 * n * seq_tokens + attention) + 3 * (2 * n * seq_tokens + attention)


def loadavg() -> float:
    return os.getloadavg()[0]


def run_size(size: str, args, tmp: Path) -> dict:
    model_dir = tmp / size
    shape = build_model(size, model_dir)
    print(f"\n[{size}] {shape['params']:,} parameters; starting workers ...", flush=True)
    variants = list(args.variants) + ["gemm"]
    workers = {v: Worker(v, str(model_dir), args, tmp) for v in variants}
    records: dict[str, list] = {v: [] for v in variants}
    loads = []
    try:
        for round_ in range(args.warmup + args.rounds):
            order = variants[round_ % len(variants):] + variants[: round_ % len(variants)]  # rotate
            for v in order:
                loads.append(loadavg())
                reply = workers[v].request("step")
                if round_ >= args.warmup:
                    records[v].append(reply)
            tag = "warm-up" if round_ < args.warmup else f"round {round_ - args.warmup + 1}/{args.rounds}"
            print(f"  {tag}: " + "  ".join(f"{v} {r[-1]['wall_s']:.2f}s" for v, r in records.items()
                                          if r and v != "gemm") + f"  load {loadavg():.1f}", flush=True)
    finally:
        finals = {}
        for v, w in workers.items():
            try:
                finals[v] = w.close()
            except Exception:  # a dead worker: report what we have
                w.proc.kill()
                finals[v] = {}
    return summarise(size, shape, records, finals, {v: w.ready for v, w in workers.items()}, loads)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(size, shape, records, finals, ready, loads) -> dict:
    gemm = {k: median([r["gflops"][k] for r in records["gemm"]]) for k in ("float32", "bfloat16")}
    out = {"shape": shape, "gemm_gflops": gemm, "load_avg": {"median": median(loads), "min": min(loads),
                                                             "max": max(loads)}, "variants": {}}
    for v, recs in records.items():
        if v == "gemm" or not recs:
            continue
        wall = median([r["wall_s"] for r in recs])
        gen, seq = median([r["gen_tokens"] for r in recs]), median([r["seq_tokens"] for r in recs])
        sample = median([r["sample_s"] for r in recs])
        train = median([r["wall_s"] - r["sample_s"] for r in recs])  # everything after sampling
        seq_len = seq / (PROMPTS_PER_BATCH * GROUP_SIZE)
        flops = model_flops(shape, gen, seq, seq_len, PROMPTS_PER_BATCH * GROUP_SIZE)
        phases = {k: median([r["phases"][k] for r in recs]) for k in recs[0]["phases"]}
        out["variants"][v] = {
            "s_per_batch": wall, "cpu_s_per_batch": median([r["cpu_s"] for r in recs]),
            "s_per_batch_all": [r["wall_s"] for r in recs],
            "gen_tokens": gen, "seq_tokens": seq,
            "e2e_tok_s": gen / wall, "gen_tok_s": gen / sample, "train_tok_s": seq / train,
            "peak_mb": finals.get(v, {}).get("peak_mb", recs[-1]["peak_mb"]), "ready_rss_mb": ready[v]["rss_mb"],
            "threads": ready[v]["threads"], "model_gflop": flops / 1e9, "achieved_gflops": flops / wall / 1e9,
            "phases_s": phases,
            **({"quality": {k: median([r["quality"][k] for r in recs if k in r["quality"]])
                            for k in recs[0]["quality"]}} if "quality" in recs[0] else {}),
        }
    out["ratios_vs_trl"] = {  # gspo variant / TRL variant, for every pair measured
        base: {v: {"throughput": m["e2e_tok_s"] / ref["e2e_tok_s"], "gen_tok_s": m["gen_tok_s"] / ref["gen_tok_s"],
                   "train_tok_s": m["train_tok_s"] / ref["train_tok_s"],
                   "cpu_time": ref["cpu_s_per_batch"] / m["cpu_s_per_batch"], "peak_mb": m["peak_mb"] / ref["peak_mb"]}
               for v, m in out["variants"].items() if v.startswith("gspo")}
        for base, ref in out["variants"].items() if base.startswith("trl")}
    return out


def print_table(size: str, result: dict) -> None:
    g, la = result["gemm_gflops"], result["load_avg"]
    print(f"\n== {size}: {result['shape']['params']:,} params; load average {la['median']:.1f} "
          f"(min {la['min']:.1f}, max {la['max']:.1f}) on {os.cpu_count()} cores; "
          f"GEMM peak fp32 {g['float32']:.0f} / bf16 {g['bfloat16']:.0f} GFLOP/s")
    head = f"{'variant':14s} {'s/batch':>8s} {'cpu s':>7s} {'gen tok/s':>10s} {'train tok/s':>11s} " \
           f"{'e2e tok/s':>10s} {'peak MB':>8s} {'GFLOP/s':>8s} {'%fp32pk':>7s}"
    print(head)
    for v, m in result["variants"].items():
        print(f"{v:14s} {m['s_per_batch']:8.2f} {m['cpu_s_per_batch']:7.2f} {m['gen_tok_s']:10.0f} "
              f"{m['train_tok_s']:11.0f} {m['e2e_tok_s']:10.0f} {m['peak_mb']:8.0f} {m['achieved_gflops']:8.1f} "
              f"{100 * m['achieved_gflops'] / g['float32']:6.0f}%")
    for base, ratios in result["ratios_vs_trl"].items():
        for v, r in ratios.items():
            print(f"{v} / {base}: throughput x{r['throughput']:.2f} (CPU time x{r['cpu_time']:.2f}), "
                  f"gen tok/s x{r['gen_tok_s']:.2f}, train tok/s x{r['train_tok_s']:.2f}, peak memory x{r['peak_mb']:.2f}")
    for v, m in result["variants"].items():
        phases = ", ".join(f"{k} {s:.2f}" for k, s in m["phases_s"].items())
        print(f"{v} phases (s): {phases}")
        if m.get("quality"):
            print(f"{v} quality: " + ", ".join(f"{k} {x:.3g}" for k, x in m["quality"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "both"], default="tiny")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--fixed-length", action="store_true", help="no early EOS: 64 tokens per response on both sides")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every worker")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                        help="libgomp wait policy for every worker (PASSIVE: no spinning on a shared machine)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from " + ",".join([*GSPO_VARIANTS, *TRL_VARIANTS]))
    parser.add_argument("--out", help="results JSON (default benchmarks/results/bench_vs_trl_<size>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        worker_main(args)
        return
    sys.path.insert(0, str(ROOT / "src"))  # the parent builds the models with gspo.models.tiny
    args.variants = args.variants.split(",")
    sizes = ["tiny", "small"] if args.size == "both" else [args.size]
    import torch
    import transformers
    import trl

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "omp_wait_policy": args.omp_wait_policy,
            "rounds": args.rounds, "warmup": args.warmup, "fixed_length": args.fixed_length,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "load_avg_start": os.getloadavg(),
            "workload": {"prompts": PROMPTS_PER_BATCH, "group_size": GROUP_SIZE, "new_tokens": NEW_TOKENS,
                         "minibatches": MINIBATCHES, "dtype": "float32 master weights"}}
    results = {"meta": meta, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        for size in sizes:
            results["sizes"][size] = run_size(size, args, Path(tmp))
            print_table(size, results["sizes"][size])
    meta["load_avg_end"] = os.getloadavg()
    out = Path(args.out) if args.out else RESULTS / f"bench_vs_trl_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
