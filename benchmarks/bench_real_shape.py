"""gspo vs TRL at real model shapes and response lengths: Qwen3-0.6B / 1.7B shapes, 151,936 vocabulary.

**Models.** Built locally, random init (seed 0), tied 151,936-token vocabulary, the embedded character
tokenizer (ids beyond it are simply never in a prompt): ``0.6b`` (28 layers, hidden 1024, intermediate
3072, 16 heads, 8 KV heads, head_dim 128, 596M parameters), ``1.7b`` (hidden 2048, intermediate 6144,
1.7B), ``tiny`` (2 layers, hidden 64, 16,384 vocabulary: a smoke check). 4,096 positions.

**Uneven lengths, the same for both sides.** A random model never samples EOS (1 in 151,936 per step), so
the EOS logit is calibrated per budget B to a per-step EOS probability ``p = LENGTH_HAZARD / B``
(2.5 / B): lengths are then roughly geometric, mean ~0.37 B, ~8% (``e^-2.5``) truncated at B. How: one
embedding column k gets the constant ``EOS_COLUMN`` in every row, so every hidden state carries a
consistent component h_k (and every logit the same shift, which cancels in the softmax); the EOS row's
entry k then gets an extra ``delta``, which moves only the EOS logit, by ``h_k * delta``. ``delta`` is
found by bisection so that the expected length ``E[min(L, B)]`` of 16 calibration rows equals the
geometric law's. The rows are the model's own samples (4 arithmetic prompts x 4, ``model.generate``,
float32, temperature 1, ``min(B, 256)`` tokens, EOS suppressed: the distribution a run samples up to its
EOS, whatever ``delta`` is); a row's survival is the product of its per-step EOS probabilities
``sigmoid(logit_eos - logsumexp(other logits))``, continued past the calibrated tokens at its mean rate.
Matching the mean per-step probability instead (tried first, on uniformly random tokens and then on
samples) left most 0.6B responses at the budget: the probability varies across rows and positions, and
its mean is carried by a few. Deterministic (seeded); the achieved lengths are recorded per variant.
``--fixed-length``: exactly B tokens on both sides (gspo ``rollout.ignore_eos=true``, TRL
``min_new_tokens``), as bench_vs_trl.py.

**Workload.** 4 prompts x 4 responses (16) per rollout batch, 4 minibatches, lr 1e-4, the arithmetic task.
Variants (``--variants``): ``gspo`` (defaults: ``optim.dtype=auto``, ...), ``gspo-fp32``
(``optim.dtype=float32 rollout.engine_dtype=float32``), ``gspo-overlap`` (``rollout.max_staleness=1``),
``trl-fp32`` (TRL 1.16 ``GRPOTrainer``, GSPO config as bench_vs_trl.py: sequence-level ratio, epsilon
3e-4 / 4e-4, beta 0, its default gradient checkpointing), ``trl-bf16`` (the same with ``bf16=True``).
**Each variant runs alone in its own process, one after another** (a 0.6B worker takes 10-15 GB), with
``--warmup`` unmeasured batches then ``--rounds`` measured ones. The warm-up batches generate only
``--warmup-tokens`` (default 8) tokens, to save time, except ``gspo-overlap``'s (its sampler process
samples ahead with the run's budget, so its warm-up is full length). Threads: all cores per worker
(gspo's ``cpu_threads``), ``OMP_WAIT_POLICY=PASSIVE``.

**Reported per variant:** seconds per rollout batch (median), sampling and everything after it, generated
tokens and tokens/s, response lengths, padding share of the training forwards (gspo: padded cells of the
(rows x columns) inputs of the forwards that take gradients), peak RSS (``ru_maxrss``; ``gspo-overlap``:
plus its sampler process's, ``RUSAGE_CHILDREN``, the two peaks need not coincide), the precision
chosen (gspo's start-line phrase), gspo's up-front memory estimate (:mod:`gspo.memory`) beside its
measured peak, and the share of the machine's limit::

    limit_s = decode_bytes / bandwidth + flops / gemm_peak[compute dtype]
    decode_bytes = steps * W * bytes(sampler dtype)                      # weights streamed per decode step
                   + sum_rows sum_t (P + t) * 2 * layers * kv_heads * head_dim * bytes(sampler dtype)   # KV read
    flops = 2 N * 4 P                                                    # prefill of the 4 distinct prompts
            + (6 N + 2 N) * trained_tokens                               # training fwd+bwd, pi_old forward
            + 4 * sum_rows 2 * layers * heads * head_dim * (P + L)^2     # causal attention, same 4 passes
    share = limit_s / measured seconds per rollout batch

with W = N = the matmul parameters (every linear layer plus the tied LM head), steps the longest response
(finished rows leave the batch, every step still streams all weights), L a row's length, P the prompt
width; ``bandwidth`` the best GB/s of a 1 GiB tensor copy (read + write) and ``gemm_peak`` the float32 /
bfloat16 GEMM peaks of bench_vs_trl.py, measured once per invocation with all cores.

**Memory first (1.7B):** gspo.memory is asked before any weights exist (the trainer's own check; TRL variants
as the same float32 run with checkpointing); a refused variant records the refusal
message and does not run (float32 master weights + AdamW for 1.7B are ~27 GB).

    PYTHONPATH=src python benchmarks/bench_real_shape.py --shape 0.6b --new-tokens 128 --fixed-length \\
        --rounds 2 --trl-python /tmp/trl-venv/bin/python
    PYTHONPATH=src python benchmarks/bench_real_shape.py --table --shape 0.6b

Results merge into ``benchmarks/results/bench_real_shape_<shape>.json`` (one case per length mode and
budget, one entry per variant: separate invocations accumulate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vs_trl's worker machinery
import bench_vs_trl as harness  # noqa: E402

ROOT = harness.ROOT
RESULTS = harness.RESULTS
PROMPTS, GROUP = 4, 4
MAX_POSITIONS = 4096
SHAPES = {  # Qwen3Config fields; tied embeddings throughout
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=16_384),
    "0.6b": dict(num_hidden_layers=28, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936),
    "1.7b": dict(num_hidden_layers=28, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936),
}
GSPO_VARIANTS = {
    "gspo": [],  # defaults: optim.dtype=auto, rollout.engine_dtype=auto, ...
    "gspo-fp32": ["optim.dtype=float32", "rollout.engine_dtype=float32"],
    # the defaults with every decoder layer's activations recomputed in the backward (TRL's default): memory
    "gspo-ckpt": ["optim.gradient_checkpointing=true"],
    # the pipelined mode, sampling beside the update; a stale batch's pi_old is its sampler's log-probs, which a
    # bf16 sampler (auto's choice here) only gives when asked (gspo refuses to recompute them from newer weights)
    "gspo-overlap": ["rollout.max_staleness=1", "loss.old_logprobs=rollout"],
}
TRL_VARIANTS = ("trl-fp32", "trl-bf16")  # bench_vs_trl.TRL_VARIANTS
VARIANTS = (*GSPO_VARIANTS, *TRL_VARIANTS)
LENGTH_HAZARD = 2.5  # per-step EOS probability x budget: mean length ~0.37 budget, e^-2.5 ~ 8% truncated
EOS_COLUMN = 1.0  # the constant every embedding row gets in column EOS_DIM (dominant: a steady h_k)
EOS_DIM = 0
CALIBRATION_TOKENS = 256  # sampled continuation tokens per calibration prompt (at most the budget)
COPY_BYTES = 2**30  # the bandwidth probe's tensor
BYTES = {"float32": 4, "bfloat16": 2}


# ---------------------------------------------------------------------------------------------------
# The model: built and calibrated in a child process (the parent never holds the weights; tiny: in the parent).
# ---------------------------------------------------------------------------------------------------
def model_config(shape: str, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(**SHAPES[shape], max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None)


def build_model(shape: str, budget: int, directory: Path, calibrate: bool = True) -> dict:
    """Save the seeded random model, its EOS calibrated for ``budget``, and the tokenizer; return the calibration.
    ``calibrate=False`` (``--fixed-length``: EOS never ends a response) leaves the EOS logit as initialised."""
    import torch
    from transformers import Qwen3ForCausalLM

    from gspo.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(harness.SEED)
    model = Qwen3ForCausalLM(model_config(shape, tokenizer)).eval()
    if calibrate:
        calibration = calibrate_eos(model, tokenizer, LENGTH_HAZARD / budget, min(budget, CALIBRATION_TOKENS))
        calibration["budget"] = budget
    else:
        calibration = {"skipped": "fixed lengths: every response has exactly the budget's tokens"}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "calibration.json").write_text(json.dumps(calibration))
    return calibration


def calibrate_eos(model, tokenizer, hazard: float, tokens: int) -> dict:
    """Set the EOS logit so that the expected response length is that of a per-step EOS probability
    ``hazard`` (module docstring); ``tokens``: calibration positions per sampled row."""
    import torch

    from gspo.tasks.arithmetic import ArithmeticTask

    emb = model.get_input_embeddings().weight  # (V, H), tied with the LM head
    eos, budget = tokenizer.eos_token_id, round(LENGTH_HAZARD / hazard)
    with torch.no_grad():
        emb[:, EOS_DIM] = EOS_COLUMN
        torch.manual_seed(harness.SEED)  # generate() samples from the global generator
        margins, hk = [], []
        for row in ArithmeticTask(seed=harness.SEED).train_rows(PROMPTS):
            prompt = tokenizer(row["prompt"], return_tensors="pt").input_ids.repeat(GROUP, 1)  # (G, P)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                                 suppress_tokens=[eos], pad_token_id=tokenizer.pad_token_id)  # (G, P + C)
            h = model.model(input_ids=ids).last_hidden_state[:, prompt.shape[1] - 1:-1]  # (G, C, H): after the norm
            logits = h @ emb.T  # (G, C, V): position t predicts response token t
            base = logits[..., eos].clone()
            logits[..., eos] = -math.inf
            margins.append(base - torch.logsumexp(logits, dim=-1))  # (G, C) log-odds of EOS before the shift
            hk.append(h[..., EOS_DIM])
        margins, hk = torch.cat(margins).double(), torch.cat(hk).double()  # (R, C), R = PROMPTS x GROUP

        def lengths(delta: float) -> tuple[torch.Tensor, torch.Tensor]:
            """(R,) expected min(length, budget) and (R,) probability of reaching the budget, per sampled row:
            its own hazards for the first C steps, then geometric at its mean rate over them."""
            q = torch.sigmoid(margins + hk * delta)  # (R, C) hazard of each step
            survive = torch.cumprod(1 - q, dim=1)  # (R, C): P(length > t + 1)
            head = 1 + survive[:, :-1].sum(1)  # sum of P(length > t) for t < C
            rate = 1 - torch.exp(torch.log1p(-q).mean(1)).clamp(max=1 - 1e-12)  # (R,)
            rest = budget - q.shape[1]
            tail = survive[:, -1] * (1 - (1 - rate) ** rest) / rate.clamp(min=1e-12)
            return head + tail, survive[:, -1] * (1 - rate) ** rest

        target = (1 - (1 - hazard) ** budget) / hazard  # E[min(L, B)] of the geometric law
        lo, hi = 0.0, 1.0 if float(hk.median()) > 0 else -1.0
        while float(lengths(hi)[0].mean()) > target:
            hi *= 2
        for _ in range(80):  # bisection: the expected length falls as the EOS logit rises
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(lengths(mid)[0].mean()) > target else (lo, mid)
        delta = (lo + hi) / 2
        emb[eos, EOS_DIM] += delta
        expected, full = lengths(delta)
        q = torch.sigmoid(margins + hk * delta)
    return {"eos_per_step_geometric": hazard, "target_mean_length": target,
            "expected_mean_length": float(expected.mean()), "expected_truncated_frac": float(full.mean()),
            "row_expected_lengths": [round(float(x), 1) for x in expected], "delta": delta,
            "mean_eos_per_step": float(q.mean()), "eos_dim": EOS_DIM, "eos_column": EOS_COLUMN,
            "h_k_median": float(hk.median()), "h_k_same_sign_frac": float((hk * hi > 0).double().mean()),
            "calibration_rows": int(hk.shape[0]), "calibration_tokens": tokens}


def shape_facts(shape: str) -> dict:
    """Parameter counts and attention sizes the limit formula needs, from the shape alone."""
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    linear = layers * (h * (2 * q + 2 * kv) + 3 * h * inter)
    head = s["vocab_size"] * h  # tied: the embedding once
    return {"params": head + linear + layers * (2 * h + 2 * s["head_dim"]) + h, "matmul_params": linear + head,
            "layers": layers, "attn_width": q, "kv_width": kv, "vocab": s["vocab_size"], "hidden": h}


# ---------------------------------------------------------------------------------------------------
# Workers (one process per variant; bench_vs_trl's Channel protocol).
# ---------------------------------------------------------------------------------------------------
def gspo_overrides(args, variant: str) -> list[str]:
    return [f"model={args.model_dir}", "steps=100000", f"seed={harness.SEED}", "log.tensorboard=false",
            f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
            f"rollout.max_new_tokens={args.new_tokens}", f"rollout.ignore_eos={str(args.fixed_length).lower()}",
            f"optim.minibatches={harness.MINIBATCHES}", f"optim.lr={harness.LR}", "device=cpu",
            f"cpu_threads={args.threads}", *GSPO_VARIANTS[variant]]


def gspo_worker(args, channel: harness.Channel) -> None:
    """One rollout batch per command through :meth:`Trainer.train_step`; lengths, padding and the estimate too."""
    import dataclasses

    import torch
    from measure_memory import peak_rss

    from gspo import memory
    from gspo.config.load import load_config
    from gspo.trainer.trainer import Trainer

    config = load_config(None, gspo_overrides(args, args.variant))
    trainer = Trainer.from_config(config, run_dir=None)
    precision = trainer.parts.precision
    seen = {"lengths": [], "prompt_tokens": 0, "cells": 0, "real": 0}
    collect = trainer._collect

    def capture(seed):  # the batch's response lengths and prompt width
        batch = collect(seed)
        seen["lengths"] = batch.rollout.lengths.tolist()
        seen["prompt_tokens"] = max(seen["prompt_tokens"], int(batch.rollout.prompt_mask.sum(1).max()))
        return batch

    def count_padding(_module, inputs):  # (ids, attention_mask, ...) of every forward that takes gradients
        if torch.is_grad_enabled():
            seen["cells"] += inputs[1].numel()
            seen["real"] += int(inputs[1].sum())

    trainer._collect = capture
    trainer.parts.policy.register_forward_pre_hook(count_padding)
    full = trainer.collector.params
    short = args.warmup_tokens and args.warmup and not config.rollout.max_staleness
    if short:
        trainer.collector.params = dataclasses.replace(full, max_new_tokens=args.warmup_tokens)
    channel.send({"ready": True, "rss_mb": harness.rss_mb(), "peak_mb": harness.peak_rss_mb(),
                  "threads": torch.get_num_threads(), "precision": precision.describe(),
                  "compute": precision.compute, "sampler": precision.sampler})
    done = 0
    while channel.receive() == "step":
        if done == args.warmup:
            trainer.collector.params = full
        seen.update(cells=0, real=0)
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = trainer.train_step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done += 1
        sample = metrics.get("sample/prefill_s", 0.0) + metrics.get("sample/decode_s", 0.0)
        channel.send({
            "wall_s": wall, "cpu_s": cpu, "peak_mb": harness.peak_rss_mb(), "rss_mb": harness.rss_mb(),
            "gen_tokens": metrics["tokens/generated"], "seq_tokens": metrics["tokens/trained"],
            "sample_s": sample, "lengths": seen["lengths"], "prompt_tokens": seen["prompt_tokens"],
            "padding_share": 1 - seen["real"] / max(seen["cells"], 1),
            "phases": {k: metrics[k] for k in ("sample/prefill_s", "sample/decode_s", "time/rollout_s",
                                               "time/logprobs_s", "time/update_s") if k in metrics},
        })
    # the run as gspo's plan configured it (auto checkpointing and token budget), at the prompts it met
    plan = trainer.parts.memory
    run = memory.RunShape.from_config(config, precision, prompt_tokens=seen["prompt_tokens"] or 1)
    if plan is not None:
        run = dataclasses.replace(run, checkpointing=plan.checkpointing, micro_tokens=plan.micro_batch_tokens)
    est = memory.estimate(memory.ModelShape.from_dir(args.model_dir), run)
    # the pipeline's sampler process: its own peak (VmHWM). Not RUSAGE_CHILDREN's ru_maxrss: Linux folds the
    # spawning worker's resident set at the fork into the child's (13 GB worker: a 5.1 GB "sampler" peak)
    pipeline = trainer.parts.pipeline
    children = peak_rss(pipeline.engine.pid) / 2**20 if pipeline is not None else 0.0
    trainer.close()
    channel.send({"peak_mb": harness.peak_rss_mb(), "children_peak_mb": children, "estimate_mb": est.total / 2**20,
                  "estimate": est.describe()})


def machine_probe(copy_bytes: int) -> dict:
    """Memory bandwidth (best GB/s of a tensor copy, read + write) and the GEMM peaks, with all cores."""
    import torch

    src = torch.ones(copy_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return {"bandwidth_gb_s": 2 * copy_bytes / best / 1e9, "gemm_gflops": harness.gemm_gflops(),
            "threads": torch.get_num_threads()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    args.variant = args.worker
    args.prompts, args.group_size = PROMPTS, GROUP  # bench_vs_trl's TRL worker reads the workload from args
    channel = harness.Channel()
    (gspo_worker if args.variant.startswith("gspo") else harness.trl_worker)(args, channel)


# ---------------------------------------------------------------------------------------------------
# Parent: machine facts, memory checks, one variant after another, the limit, the JSON.
# ---------------------------------------------------------------------------------------------------
def machine_facts() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"cpu": fields.get("Model name", platform.processor() or platform.machine()).strip(),
            "cores": os.cpu_count(), "bf16_flags": sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f",
                                                                    "avx2"})}


def worker_env(args, threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_WAIT_POLICY": args.omp_wait_policy, "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


def refusal(args, variant: str, model_dir: Path, budget: int) -> str | None:
    """gspo.memory's verdict on this variant before any weights exist (the trainer's own check; TRL: as gspo
    fp32 with checkpointing, which is what TRL keeps)."""
    import torch

    from gspo import memory, memory_plan
    from gspo.config.load import load_config
    from gspo.errors import ConfigError
    from gspo.precision import resolve_precision

    shape = memory.ModelShape.from_dir(model_dir)
    gspo_variant = variant if variant in GSPO_VARIANTS else "gspo-fp32"
    extra = [] if variant in GSPO_VARIANTS else ["optim.gradient_checkpointing=true"]
    ns = argparse.Namespace(**{**vars(args), "model_dir": str(model_dir), "new_tokens": budget})
    config = load_config(None, gspo_overrides(ns, gspo_variant) + extra)
    precision = resolve_precision(config.optim.dtype, config.rollout.engine_dtype, torch.device("cpu"), shape.params)
    run = memory.RunShape.from_config(config, precision)
    try:  # what gspo itself decides before loading: auto checkpointing / token budget, then the check
        memory_plan.plan(shape, run, checkpointing=config.optim.gradient_checkpointing,
                         micro_batch_tokens=config.optim.micro_batch_tokens,
                         available=memory_plan.available_bytes("cpu"))
    except ConfigError as refused:
        return str(refused)
    return None


def limit_seconds(facts: dict, machine: dict, lengths: list[int], prompt: int, trained: float,
                  sampler: str, compute: str) -> float:
    """The machine's limit for one rollout batch (module docstring)."""
    n, layers = facts["matmul_params"], facts["layers"]
    steps = max(lengths, default=0)
    kv_reads = sum(prompt * length + length * (length + 1) / 2 for length in lengths)  # cache entries read
    decode_bytes = steps * n * BYTES[sampler] + kv_reads * 2 * layers * facts["kv_width"] * BYTES[sampler]
    attention = sum(2 * layers * facts["attn_width"] * (prompt + length) ** 2 for length in lengths)
    flops = 2 * n * PROMPTS * prompt + 8 * n * trained + 4 * attention
    return decode_bytes / (machine["bandwidth_gb_s"] * 1e9) + flops / (machine["gemm_gflops"][compute] * 1e9)


def run_variant(variant: str, args, model_dir: Path, log_dir: Path) -> dict:
    python = args.trl_python if variant.startswith("trl") else sys.executable
    extra = ["--new-tokens", str(args.new_tokens[0]), "--warmup-tokens", str(args.warmup_tokens)]
    worker = harness.Worker(variant, str(model_dir), args, log_dir, script=__file__, extra=extra, python=python,
                            env=worker_env(args, args.threads))
    records = []
    try:
        for i in range(args.warmup + args.rounds):
            reply = worker.request("step")
            tag = "warm-up" if i < args.warmup else f"round {i - args.warmup + 1}/{args.rounds}"
            print(f"  {variant} {tag}: {reply['wall_s']:.1f} s, {reply['gen_tokens']} tokens, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            if i >= args.warmup:
                records.append(reply)
        final = worker.close()
    except Exception:
        worker.proc.kill()
        raise
    return {"ready": worker.ready, "records": records, "final": final}


def summarise(variant: str, run: dict, facts: dict, machine: dict, budget: int) -> dict:
    recs, ready, final = run["records"], run["ready"], run["final"]
    med = lambda key: statistics.median(r[key] for r in recs)  # noqa: E731
    wall, sample, gen, seq = med("wall_s"), med("sample_s"), med("gen_tokens"), med("seq_tokens")
    trl = variant.startswith("trl")
    compute = ready.get("compute", "bfloat16" if variant == "trl-bf16" else "float32")
    sampler = ready.get("sampler", compute)
    lengths = sorted(x for r in recs for x in r["lengths"])
    prompt = recs[-1].get("prompt_tokens") or round((seq - gen) / (PROMPTS * GROUP))
    limits = [limit_seconds(facts, machine, r["lengths"], prompt, r["seq_tokens"], sampler, compute) for r in recs]
    out = {
        "s_per_batch": wall, "s_per_batch_all": [r["wall_s"] for r in recs], "cpu_s_per_batch": med("cpu_s"),
        "sample_s": sample, "after_sample_s": wall - sample, "gen_tokens": gen, "trained_tokens": seq,
        "gen_tok_s": gen / sample if sample else None, "e2e_tok_s": gen / wall,
        "lengths": {"min": lengths[0], "median": statistics.median(lengths), "max": lengths[-1],
                    "mean": statistics.fmean(lengths), "at_budget_frac": sum(x >= budget for x in lengths) / len(lengths)},
        "phases_s": {k: statistics.median(r["phases"][k] for r in recs) for k in recs[0]["phases"]},
        "peak_mb": final.get("peak_mb", recs[-1]["peak_mb"]), "ready_rss_mb": ready["rss_mb"],
        "threads": ready["threads"], "precision": ready.get("precision", "TRL bf16=True" if variant == "trl-bf16"
                                                            else "TRL float32"),
        "limit_s": statistics.median(limits), "limit_share": statistics.median(limits) / wall,
    }
    if not trl:
        out["padding_share"] = med("padding_share")
        out["estimate_mb"], out["estimate"] = final.get("estimate_mb"), final.get("estimate")
        if variant == "gspo-overlap":  # its sampler process (a child of the worker)
            out["children_peak_mb"] = final.get("children_peak_mb", 0.0)
    return out


def run_case(args, shape: str, budget: int, tmp: Path, machine: dict) -> dict:
    """All the variants of one (shape, length mode, budget) case, one process after another."""
    from gspo.models.tiny import build_char_tokenizer

    # one model per calibration; --fixed-length needs none, so every budget shares one uncalibrated model
    model_dir = (Path(args.model_cache) if args.model_cache else tmp) / \
        (f"{shape}-fixed" if args.fixed_length else f"{shape}-{budget}")
    model_dir.mkdir(parents=True, exist_ok=True)
    built = (model_dir / "calibration.json").exists() and any(model_dir.glob("*.safetensors"))
    model_config(shape, build_char_tokenizer()).save_pretrained(model_dir)  # config.json: the memory check's input
    args.new_tokens = [budget]
    facts = shape_facts(shape)
    variants, refused = {}, {}
    for v in args.variants:
        message = refusal(args, v, model_dir, budget)
        if message and v not in GSPO_VARIANTS:
            message = f"(TRL not run; the same float32 run with checkpointing in gspo) {message}"
        if message:
            refused[v] = message
            print(f"  {v}: refused by gspo.memory: {message}", flush=True)
    to_run = [v for v in args.variants if v not in refused]
    calibration = None
    if to_run and built:
        print(f"[{shape}, {budget} tokens] the model built earlier in {model_dir}", flush=True)
    elif to_run:
        print(f"[{shape}, {budget} tokens] building the model ...", flush=True)
        if shape == "tiny":  # a few MB: built here, one process fewer
            build_model(shape, budget, model_dir, calibrate=not args.fixed_length)
        else:  # the parent never holds the weights
            subprocess.run([sys.executable, __file__, "--build", str(model_dir), "--shape", shape,
                            "--new-tokens", str(budget)] + (["--fixed-length"] if args.fixed_length else []),
                           check=True, env=worker_env(args, args.threads))
        calibration = json.loads((model_dir / "calibration.json").read_text())
    for v in to_run:
        print(f"[{shape}, {budget} tokens] {v} ...", flush=True)
        try:
            variants[v] = summarise(v, run_variant(v, args, model_dir, tmp), facts, machine, budget)
        except Exception as error:  # a worker that died (OOM killer): say so, keep the other variants
            log = tmp / f"{v}.log"
            tail = log.read_text()[-1500:] if log.exists() else ""
            variants[v] = {"failed": f"{error}: ...{tail}"}
            print(f"  {v} failed: {error}", flush=True)
            continue
        m = variants[v]
        print(f"  {v}: {m['s_per_batch']:.1f} s/batch, {m['gen_tokens']:.0f} tokens, peak {m['peak_mb']:.0f} MB, "
              f"{100 * m['limit_share']:.0f}% of the limit", flush=True)
    variants.update({v: {"refused": message} for v, message in refused.items()})
    return {"shape": facts, "calibration": calibration, "variants": variants, "fixed_length": args.fixed_length,
            "budget": budget, "rounds": args.rounds, "warmup": args.warmup, "warmup_tokens": args.warmup_tokens}


def case_key(fixed_length: bool, budget: int) -> str:
    return f"{'exact' if fixed_length else 'uneven'}-{budget}"


def results_path(args, shape: str) -> Path:
    return Path(args.out) if args.out else RESULTS / f"bench_real_shape_{shape}.json"


def merge(path: Path, key: str, case: dict, meta: dict) -> None:
    """Add this invocation's variants to the file's case (other variants and cases stay)."""
    data = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    old = data["cases"].get(key, {})
    case["variants"] = {**old.get("variants", {}), **{v: {**m, "meta": meta} for v, m in case["variants"].items()}}
    data["cases"][key] = {**old, **case}
    data["machine"] = meta["machine"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def table(path: Path) -> str:
    """The results file as a markdown table, one row per (case, variant)."""
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['bf16_flags'])}; copy bandwidth "
             f"{m['bandwidth_gb_s']:.1f} GB/s; GEMM peak fp32 {m['gemm_gflops']['float32']:.0f} / bf16 "
             f"{m['gemm_gflops']['bfloat16']:.0f} GFLOP/s", "",
             "| case | variant | s / batch | sampling | after | gen tokens | e2e tok/s | lengths min/med/max | padding "
             "| peak RSS GB | estimate GB | precision | limit s | share |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for key, case in data["cases"].items():
        for v, r in case["variants"].items():
            if "s_per_batch" not in r:
                why = f"refused by gspo.memory: {r['refused']}" if "refused" in r else f"failed: {r.get('failed')}"
                lines.append(f"| {key} | {v} | {why} |" + " |" * 11)
                continue
            ln, pad, est = r["lengths"], r.get("padding_share"), r.get("estimate_mb")
            child = r.get("children_peak_mb", 0) / 1024
            sampler = f" (+{child:.1f} sampler)" if child >= 0.1 else ""
            lines.append(
                f"| {key} | {v} | {r['s_per_batch']:.1f} | {r['sample_s']:.1f} | {r['after_sample_s']:.1f} | "
                f"{r['gen_tokens']:.0f} | {r['e2e_tok_s']:.1f} | {ln['min']}/{ln['median']:.0f}/{ln['max']} | "
                f"{'' if pad is None else f'{100 * pad:.0f}%'} | {r['peak_mb'] / 1024:.1f}{sampler} | "
                f"{'' if est is None else f'{est / 1024:.1f}'} | {r['precision'].removeprefix('precision: ')} | {r['limit_s']:.1f} | "
                f"{100 * r['limit_share']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="0.6b")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512, 2048], help="budgets, one case each")
    parser.add_argument("--fixed-length", action="store_true", help="exactly --new-tokens tokens on both sides")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="measured rollout batches per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured batches first")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of a warm-up batch (0: the budget)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per worker")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"])
    parser.add_argument("--trl-python", default=sys.executable, help="a Python with trl installed (TRL variants)")
    parser.add_argument("--copy-bytes", type=int, default=COPY_BYTES, help="the bandwidth probe's tensor size")
    parser.add_argument("--model-cache", help="keep the built models here and reuse them in later invocations "
                        "(a 0.6B build with its EOS calibration takes minutes; default: a temporary directory)")
    parser.add_argument("--out", help="results JSON (default benchmarks/results/bench_real_shape_<shape>.json)")
    parser.add_argument("--table", action="store_true", help="print the results file as a markdown table and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_model(args.shape, args.new_tokens[0], Path(args.build), calibrate=not args.fixed_length)
        return
    if args.worker:
        args.new_tokens = args.new_tokens[0]
        worker_main(args)
        return
    path = results_path(args, args.shape)
    if args.table:
        print(table(path))
        return
    sys.path.insert(0, str(ROOT / "src"))
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch loads libgomp
    import torch

    torch.set_num_threads(args.threads)  # the parent holds no weights: it measures the machine itself
    machine = {**machine_facts(), **machine_probe(args.copy_bytes)}
    print(f"machine: {machine}", flush=True)
    budgets = list(args.new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-real-shape-") as tmp:
        for budget in budgets:
            meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "load_avg": os.getloadavg(),
                    "threads": args.threads, "omp_wait_policy": args.omp_wait_policy}
            case = run_case(args, args.shape, budget, Path(tmp), machine)
            meta["load_avg_end"] = os.getloadavg()
            merge(path, case_key(args.fixed_length, budget), case, meta)
    print(f"\nwrote {path}\n")
    print(table(path))


if __name__ == "__main__":
    main()
