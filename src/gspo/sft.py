"""Supervised warm-start of the embedded tiny model on the arithmetic task, and its evaluation.

``warm_start`` trains :func:`gspo.models.tiny.build_tiny_qwen3` from scratch with cross-entropy on the
answer and ``<eos>`` tokens only (prompt tokens are masked out), then saves a standard Hugging Face
checkpoint plus ``warm_start.json`` (arguments and held-out accuracies).

The defaults are the calibrated recipe of the embedded ``tiny-arith`` checkpoint. It is deliberately
left imperfect, in the regime where RL at temperature 1.0 with an exact-match reward has work to do:
- training stops early, as soon as greedy accuracy on fixed training-split probe rows reaches
  ``target_accuracy`` (0.75). This ~1M model learns the task in a sudden transition whose timing
  varies with the seed (from about 250 to over 700 steps), so a fixed step count would land in a
  different regime for each seed, while an accuracy target lands in the same one;
- label smoothing 0.1 leaves about 10% of each token's probability spread over the other characters.
  Greedy decoding does not care, but sampling at T=1.0 then slips a character in a large share of
  answers: held-out sampled accuracy sits about 30 points below greedy, and sharpening that
  distribution is the first thing RL learns. (Measured: without smoothing the gap was ~20 points and
  the same RL run lifted sampled accuracy about half as fast.)

Determinism: for a fixed seed the initialisation (``build_tiny_qwen3(seed=...)``), the data order
(``ArithmeticTask(seed=...)``), the early-stopping probes (greedy) and the optimiser are deterministic,
and training runs on one pinned thread, so reruns with the same torch build and CPU type give
bitwise-identical weights (checked for the embedded checkpoint). Another torch build or CPU
instruction set may change float rounding and hence the last bits.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3
from gspo.tasks.arithmetic import ArithmeticTask, exact_answer_reward, format_reward

log = logging.getLogger(__name__)
StepHook = Callable[[int, int, dict], None]  # on_step(step, steps, metrics): progress of a supervised run
SFT_LOSS_KEY = "loss/sft"  # the per-step metric on_step receives (a progress column of gspo.trainer.logging)

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips (prompt and padding positions)
WARMUP_FRACTION = 0.05  # linear warm-up share of the steps, then cosine decay to LR_FLOOR * lr
LR_FLOOR = 0.1
PROBE_SEED_OFFSET = 7919  # the early-stopping probe rows come from their own stream of training rows


def encode_sft_batch(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` ids with labels on the answer and EOS only."""
    # prompts as the RL trainer renders them (gspo.tasks.render): with the tokenizer's own BOS, if any
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the labelled (answer + EOS) positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay from 1 to LR_FLOOR."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(model, tokenizer, task: ArithmeticTask, *, steps: int, batch_size: int, lr: float,
              weight_decay: float = 0.0, label_smoothing: float = 0.0, stop: Callable[[], bool] | None = None,
              check_every: int = 20, log_every: int = 100, on_step: StepHook | None = None) -> list[float]:
    """Run up to ``steps`` AdamW steps on fresh training rows; returns the per-step losses.

    The learning rate warms up linearly, then decays (cosine) over ``steps``. If ``stop`` is given it
    is called every ``check_every`` steps (model in eval mode) and training ends when it returns True.
    ``on_step(step, steps, metrics)`` is called after each step (``gspo sft``'s progress display).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    rows = task.iter_train()
    losses = []
    for step in range(steps):
        model.train()
        batch = encode_sft_batch(tokenizer, [next(rows) for _ in range(batch_size)])
        loss = sft_loss(model, batch, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, steps, {SFT_LOSS_KEY: losses[-1]})
        if log_every and (step + 1) % log_every == 0:
            log.info("sft step %d/%d loss %.4f", step + 1, steps, sum(losses[-log_every:]) / log_every)
        if stop is not None and (step + 1) % check_every == 0:
            model.eval()
            if stop():
                break
    model.eval()
    return losses


def _split_row(row: dict) -> tuple[str, dict]:
    """(prompt, other columns): the reward calling convention ``reward(prompt, completion, **columns)``."""
    return row["prompt"], {k: v for k, v in row.items() if k != "prompt"}


def _generate(model, tokenizer, prompts: list[str], *, temperature: float, n_samples: int,
              max_new_tokens: int) -> torch.Tensor:
    """(len(prompts) * n_samples, <= max_new_tokens) completion ids from left-padded ``model.generate``."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)  # BOS if it has one
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)  # pure sampling: no top-k / top-p truncation
    out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n_samples,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return out[:, enc["input_ids"].shape[1] :]


@torch.no_grad()
def evaluate_accuracy(model, tokenizer, rows: list[dict], *, temperature: float, n_samples: int = 1,
                      max_new_tokens: int = 8, batch_size: int = 256, seed: int = 0) -> dict:
    """Exact-match accuracy of ``model`` on ``rows`` with ``n_samples`` completions per prompt.

    ``temperature == 0`` decodes greedily (then ``n_samples`` must be 1). Sampling is pure (no top-k /
    top-p) and seeded with ``seed`` without disturbing the global RNG. Returns ``accuracy`` (mean over
    all completions), ``format`` (share that are integers), ``eos`` (share that emitted ``<eos>``
    within ``max_new_tokens``), ``pass_at_n`` and ``mixed_groups`` (share of prompts whose samples are
    neither all right nor all wrong: the groups that give GSPO a non-zero advantage).
    """
    if temperature == 0 and n_samples != 1:
        raise ValueError("greedy decoding (temperature=0) needs n_samples=1")
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    correct, formatted, eos = [], [], []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                completions = _generate(model, tokenizer, [r["prompt"] for r in chunk], temperature=temperature,
                                        n_samples=n_samples, max_new_tokens=max_new_tokens)
                for j, text in enumerate(tokenizer.batch_decode(completions, skip_special_tokens=False)):
                    prompt, columns = _split_row(chunk[j // n_samples])
                    correct.append(exact_answer_reward(prompt, text, **columns))
                    formatted.append(format_reward(prompt, text, **columns))
                    eos.append(float((completions[j] == tokenizer.eos_token_id).any()))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    per_prompt = torch.tensor(correct).view(len(rows), n_samples).mean(dim=1)  # (N,)
    return {
        "accuracy": sum(correct) / len(correct),
        "format": sum(formatted) / len(formatted),
        "eos": sum(eos) / len(eos),
        "pass_at_n": float((per_prompt > 0).float().mean()),
        "mixed_groups": float(((per_prompt > 0) & (per_prompt < 1)).float().mean()),
        "n_prompts": len(rows),
        "n_samples": n_samples,
    }


def _build_model(arch: str, tokenizer, seed: int, model_kwargs: dict):
    if arch == "qwen3":
        return build_tiny_qwen3(tokenizer, seed=seed, **model_kwargs)
    if arch == "qwen3-moe":
        from gspo.models.tiny_moe import build_tiny_qwen3_moe

        return build_tiny_qwen3_moe(tokenizer, seed=seed, **model_kwargs)
    raise ValueError(f"arch={arch!r}: the warm-start builds 'qwen3' or 'qwen3-moe'")


def _accuracy_stop(model, tokenizer, rows: list[dict], target: float, history: list[float], max_new_tokens: int):
    """A ``stop()`` callback for :func:`train_sft`: True once greedy accuracy on ``rows`` reaches ``target``."""

    def stop() -> bool:
        history.append(evaluate_accuracy(model, tokenizer, rows, temperature=0.0,
                                         max_new_tokens=max_new_tokens)["accuracy"])
        return history[-1] >= target

    return stop


def warm_start(out_dir: str | Path, *, seed: int = 0, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
               weight_decay: float = 0.0, label_smoothing: float = 0.1, target_accuracy: float | None = 0.75,
               check_every: int = 20, n_probe: int = 256, arch: str = "qwen3", model_kwargs: dict | None = None,
               task_kwargs: dict | None = None, n_eval: int = 256, eval_samples: int = 8, max_new_tokens: int = 8,
               num_threads: int | None = 1, bos: bool = False, on_step: StepHook | None = None) -> Path:
    """Train the tiny model from scratch on the task's training rows and save the checkpoint to ``out_dir``.

    ``steps`` is the maximum (and the length of the learning-rate schedule). ``target_accuracy`` (if
    not None) ends training at the first multiple of ``check_every`` steps where greedy accuracy on
    ``n_probe`` fixed training-split rows reaches it; held-out rows never steer training.
    ``num_threads`` pins torch's intra-op threads for the run (restored afterwards): one thread gives
    a reduction order independent of the machine's core count, and on a busy 2-core box it is also
    the fastest choice for a model this small; None keeps the current setting. ``on_step``: see
    :func:`train_sft`.

    Writes ``model.safetensors`` (float32, ~4 MB), the tokenizer files and ``warm_start.json``
    (arguments, steps run, wall and CPU seconds, held-out greedy and T=1.0 sampled accuracy on
    ``n_eval`` prompts with ``eval_samples`` samples each).
    """
    args = {k: v for k, v in locals().items() if k not in ("out_dir", "on_step")}
    task = ArithmeticTask(seed=seed, **(task_kwargs or {}))
    tokenizer = build_char_tokenizer(bos=bos)  # bos: a base-model-style tokenizer that adds <bos>
    model = _build_model(arch, tokenizer, seed, dict(model_kwargs or {}))
    probe_accuracy: list[float] = []
    stop = None
    if target_accuracy is not None:
        probe_rows = replace(task, seed=seed + PROBE_SEED_OFFSET).train_rows(n_probe)
        stop = _accuracy_stop(model, tokenizer, probe_rows, target_accuracy, probe_accuracy, max_new_tokens)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        # Nothing below draws random numbers (no dropout; seeded data order; greedy probes), so the
        # weights depend only on the seed, the arguments and the torch build.
        losses = train_sft(model, tokenizer, task, steps=steps, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, label_smoothing=label_smoothing, stop=stop,
                           check_every=check_every, on_step=on_step)
        report = {"args": args, "task": asdict(task), "steps_run": len(losses),
                  "train_seconds": round(time.perf_counter() - wall, 1),
                  "train_cpu_seconds": round(time.process_time() - cpu, 1), "probe_greedy": probe_accuracy,
                  "first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                  "n_parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
        report.update(_heldout_report(model, tokenizer, task, n_eval, eval_samples, max_new_tokens, seed))
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("warm start: %d steps in %.0fs -> %s", len(losses), report["train_seconds"], out_dir)
    return out_dir


def _heldout_report(model, tokenizer, task: ArithmeticTask, n_eval: int, eval_samples: int, max_new_tokens: int,
                    seed: int) -> dict:
    if not n_eval:
        return {}
    rows = task.eval_rows(n_eval)
    return {
        "heldout_greedy": evaluate_accuracy(model, tokenizer, rows, temperature=0.0, max_new_tokens=max_new_tokens),
        "heldout_sampled_t1": evaluate_accuracy(model, tokenizer, rows, temperature=1.0, n_samples=eval_samples,
                                                max_new_tokens=max_new_tokens, seed=seed),
    }


# The recipes behind the embedded checkpoints (src/gspo/assets/<dir>); `gspo sft model=<name>` reruns them.
# Empty means warm_start's defaults, which were calibrated on the dense tiny-arith model.
EMBEDDED_RECIPES: dict[str, dict] = {
    "tiny-arith": {},
    "tiny-moe": {"arch": "qwen3-moe"},  # same recipe, not separately calibrated
}


def warm_start_embedded(name: str, out_dir: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Rebuild the embedded checkpoint ``name`` (see :data:`EMBEDDED_RECIPES`) into ``out_dir``."""
    if name not in EMBEDDED_RECIPES:
        raise ValueError(f"no warm-start recipe for {name!r}; known: {', '.join(EMBEDDED_RECIPES)}")
    return warm_start(out_dir, seed=seed, **{**EMBEDDED_RECIPES[name], **overrides})
