"""Supervised warm start of the embedded agent model ``tiny-calc`` on calculator demonstrations.

A demonstration is an episode written out by hand and run through the real environment and message
format: ``prompt | tool call + EOS | <tool_response>result</tool_response> | answer + EOS`` (or, for a
share ``1 - tool_fraction`` of the rows, ``prompt | answer + EOS``). Cross-entropy is taken on the
model's tokens only (the same mask RL trains), never on the prompt or the environment's tokens.

Deterministic like :mod:`gspo.sft`: seeded initialisation, seeded demonstrations, one pinned thread,
a fixed number of steps (no early stop, so the recipe is one number). The held-out report runs the
same :class:`~gspo.agents.episode.EpisodeRunner` the trainer runs.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from gspo.agents.calculator import (CONTEXT, MAX_TURN_TOKENS, CalculatorTask, build_calc_tokenizer,
                                    calculator_environment, tool_call_text)
from gspo.agents.format import MessageFormat
from gspo.sft import IGNORE_INDEX, SFT_LOSS_KEY, StepHook, _lr_factor


def demonstration(row: dict, tokenizer, fmt: MessageFormat, env, *, use_tool: bool) -> tuple[list[int], list[bool]]:
    """(ids, model mask) of one demonstrated episode, prompt included (the prompt is not the model's)."""
    eos = tokenizer.eos_token_id
    ids = fmt.encode(row["prompt"])
    model = [False] * len(ids)
    if use_tool:
        state = env.reset(row)
        call = tool_call_text(row)
        state.turns.append(call)
        reply = env.step(state, call)
        turn = fmt.encode(call) + [eos]
        env_ids = fmt.message_ids(reply.message, ended_with_eos=True)
        ids += turn + env_ids
        model += [True] * len(turn) + [False] * len(env_ids)
    answer = fmt.encode(row["answer"]) + [eos]
    return ids + answer, model + [True] * len(answer)


def demo_batch(rows: list[dict], uses: list[bool], tokenizer, fmt: MessageFormat, env) -> dict[str, torch.Tensor]:
    demos = [demonstration(r, tokenizer, fmt, env, use_tool=u) for r, u in zip(rows, uses)]
    width = max(len(ids) for ids, _ in demos)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    for i, (ids, model) in enumerate(demos):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        keep = torch.tensor(model)
        labels[i, : len(ids)] = torch.where(keep, torch.tensor(ids), torch.full_like(torch.tensor(ids), IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def warm_start_calculator(out_dir: str | Path, *, seed: int = 0, steps: int = 600, batch_size: int = 64,
                          lr: float = 2e-3, tool_fraction: float = 0.5, n_eval: int = 128, eval_samples: int = 4,
                          num_threads: int | None = 1, on_step: StepHook | None = None) -> Path:
    """Train ``tiny-calc`` from scratch on demonstrations and save it (weights, tokenizer, ``warm_start.json``);
    ``on_step(step, steps, metrics)`` is called after each step (``gspo sft``'s progress display)."""
    args = {k: v for k, v in locals().items() if k not in ("out_dir", "on_step")}
    from gspo.models.tiny import build_tiny_qwen3

    tokenizer = build_calc_tokenizer()
    fmt, env = MessageFormat(tokenizer), calculator_environment()
    model = build_tiny_qwen3(tokenizer, max_position_embeddings=CONTEXT, seed=seed)
    task, rng = CalculatorTask(seed=seed), random.Random(seed)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        wall = time.perf_counter()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
        stream, losses = task.iter_train(), []
        model.train()
        for step in range(steps):
            rows = [next(stream) for _ in range(batch_size)]
            batch = demo_batch(rows, [rng.random() < tool_fraction for _ in rows], tokenizer, fmt, env)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, steps, {SFT_LOSS_KEY: losses[-1]})
        report = {"args": args, "steps_run": len(losses), "train_seconds": round(time.perf_counter() - wall, 1),
                  "first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                  "n_parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
        report.update(heldout_report(model, tokenizer, task.eval_rows(n_eval), eval_samples, seed))
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def heldout_report(model, tokenizer, rows: list[dict], samples: int, seed: int) -> dict:
    """Greedy and T=1 held-out accuracy and tool rates, through the trainer's episode runner."""
    from gspo.agents.collect import EpisodeEvaluator
    from gspo.agents.episode import EpisodeRunner
    from gspo.config.schema import Config
    from gspo.tasks.rewards import resolve_rewards
    from gspo.trainer.build import build_engine
    from gspo.tasks.arithmetic import exact_answer_reward

    engine = build_engine(Config(), model, tokenizer, None)  # the default in-process engine, via the assembly point
    runner = EpisodeRunner(engine, calculator_environment(), MessageFormat(tokenizer),
                           lambda ids: tokenizer.decode(ids, skip_special_tokens=True), tokenizer.pad_token_id, CONTEXT)
    render = lambda row: list(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])  # noqa: E731
    rewards = resolve_rewards([], {"exact_answer": (exact_answer_reward, 1.0)})
    evaluator = EpisodeEvaluator(runner, render, rewards, MAX_TURN_TOKENS)
    was_training = model.training
    model.eval()
    try:
        return {"heldout_greedy": evaluator.evaluate(rows, temperature=0.0),
                "heldout_sampled_t1": evaluator.evaluate(rows, temperature=1.0, samples=samples, seed=seed)}
    finally:
        model.train(was_training)
