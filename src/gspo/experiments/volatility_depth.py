"""Expert volatility after one policy update, as a function of depth (GSPO paper section 5.3).

The paper: after one gradient update of the 48-layer Qwen3-30B-A3B, about 10% of the experts
activated for the same tokens change, and the effect grows with depth — the reason token-level
ratios are noisy on MoE models and GRPO needs Routing Replay. The probe, per depth and seed:

1. build a tiny Qwen3-MoE of that depth (8 experts, top-2) and give it a short supervised warm-up
   (:func:`gspo.sft.train_sft`) so its routers are trained rather than random;
2. sample one rollout batch (P prompts x G responses) and score it with a per-digit partial-credit
   reward: after a short warm-up exact-match is nearly always 0, and a group with equal rewards has
   zero advantage; the probe measures how routing reacts to one update, not what the update optimises;
3. capture the routing of the batch (old policy), take ONE AdamW step with the GSPO loss (eq. 5,
   clip 3e-4 / 4e-4) at each learning rate of ``lrs`` (the RL rate and 10x it), capture the routing of
   the same tokens again. On the first, on-policy minibatch every ratio is 1, so GSPO's gradient (eq. 10)
   equals GRPO's: one probe stands for both algorithms;
4. report :func:`gspo.moe.expert_volatility` on response tokens (and on all real tokens), per layer.

Deviation from the paper: the models are 1-8 layers deep and warmed up for seconds, not 48 layers
trained at scale; the absolute share depends on the learning rate (AdamW's first step moves every
weight by about ``lr``), so only the trend with depth is comparable. The warm-up has no
load-balancing loss (``gspo.sft`` trains with cross-entropy only), so routers concentrate on a few
experts; :func:`expert_shares` measures how much (reported as the busiest expert's share).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from gspo.algorithms import group_advantages, gspo_loss
from gspo.config.schema import Config
from gspo.logprobs import token_logprobs
from gspo.models.tiny import build_char_tokenizer
from gspo.models.tiny_moe import build_tiny_qwen3_moe
from gspo.moe import capture_routing, expert_volatility
from gspo.rollout.base import SamplingParams
from gspo.sft import train_sft
from gspo.tasks.arithmetic import ArithmeticTask, EOS_TEXT
from gspo.trainer.build import build_engine

GSPO_CLIP = (3e-4, 4e-4)  # paper section 5.1


@dataclass(frozen=True)
class ProbeSettings:
    depths: tuple[int, ...] = (1, 2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    sft_steps: int = 60  # warm-up steps per model (0 = random routers)
    sft_batch: int = 64
    sft_lr: float = 1e-2
    prompts: int = 16
    group_size: int = 8
    max_new_tokens: int = 8
    lrs: tuple[float, ...] = (1e-4, 1e-3)  # the RL learning rate of the main runs, and 10x it


def partial_credit(completion: str, answer: str) -> float:
    """Share of answer characters matched position by position (1.0 iff exactly right)."""
    text = completion.split(EOS_TEXT, 1)[0].strip()
    if text == answer:
        return 1.0
    hits = sum(a == b for a, b in zip(text, answer))
    return 0.5 * hits / max(len(answer), len(text), 1)


def probe_volatility(depth: int, seed: int, settings: ProbeSettings) -> dict:
    """Volatility after one update at each learning rate, from the same weights and rollout batch."""
    started, cpu = time.perf_counter(), time.process_time()
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3_moe(tokenizer, num_layers=depth, seed=seed)
    task = ArithmeticTask(seed=seed)
    if settings.sft_steps:
        train_sft(model, tokenizer, task, steps=settings.sft_steps, batch_size=settings.sft_batch,
                  lr=settings.sft_lr, log_every=0)
    model.eval()  # no dropout in Qwen3-MoE; eval mode only keeps the forwards deterministic
    batch = _rollout_batch(model, tokenizer, task, settings, seed)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    num_t = mask.shape[1]
    with torch.no_grad(), capture_routing(model) as before:
        old_logprobs = token_logprobs(model, ids, attn, num_t)  # (B, T)
    response_positions = torch.zeros_like(attn)  # (B, P + T) bool
    response_positions[:, -num_t:] = mask
    out = {"depth": depth, "seed": seed, "reward_mean": float(batch["rewards"].mean()),
           "busiest_expert_share": [max(s) for s in expert_shares(before, response_positions,
                                                                  model.config.num_experts)],
           "signal_groups": float((batch["advantages"].view(-1, settings.group_size) != 0).any(1).float().mean())}
    out["lrs"] = {}
    for lr in settings.lrs:
        updated = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(updated.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        logprobs = token_logprobs(updated, ids, attn, num_t)  # (B, T), autograd on
        gspo_loss(logprobs, old_logprobs, batch["advantages"], mask, clip_low=GSPO_CLIP[0],
                  clip_high=GSPO_CLIP[1]).loss.backward()
        torch.nn.utils.clip_grad_norm_(updated.parameters(), 1.0)  # as the trainer does
        optimizer.step()
        with torch.no_grad(), capture_routing(updated) as after:
            updated(input_ids=ids, attention_mask=attn)
        response, per_layer = expert_volatility(before, after, mask=response_positions)
        everywhere, _ = expert_volatility(before, after, mask=attn)
        out["lrs"][repr(lr)] = {"response": float(response), "all_tokens": float(everywhere),
                                "per_layer": [float(v) for v in per_layer]}
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - started, time.process_time() - cpu
    return out


def expert_shares(routing, mask: torch.Tensor, num_experts: int) -> list[list[float]]:
    """Per MoE layer, the share of top-k routing slots each of ``num_experts`` experts takes on the
    ``mask`` (B, S) positions.

    Uniform routing gives 1/E per expert; a share of 1/k (0.5 for top-2) means every token uses that expert.
    """
    shares = []
    for indices in routing.indices:  # (B, S, k) per layer
        chosen = indices[mask.to(indices.device)].flatten()  # (N * k,)
        counts = torch.bincount(chosen, minlength=num_experts).double()  # (E,)
        shares.append((counts / counts.sum().clamp_min(1)).tolist())
    return shares


@torch.no_grad()
def model_expert_shares(model_path: str, n_rows: int = 256) -> dict:
    """``{"shares": per layer, per expert}`` (:func:`expert_shares`) of a saved MoE on held-out
    ``prompt + answer`` sequences (all real tokens), with the seconds it took."""
    from gspo.models.load import load_model, load_tokenizer

    started, cpu = time.perf_counter(), time.process_time()
    tokenizer, model = load_tokenizer(model_path), load_model(model_path).eval()
    rows = ArithmeticTask(seed=0).eval_rows(n_rows)
    enc = tokenizer([r["prompt"] + r["answer"] for r in rows], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    with capture_routing(model) as routing:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return {"shares": expert_shares(routing, enc["attention_mask"].bool(), model.config.num_experts),
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


@torch.no_grad()
def _rollout_batch(model, tokenizer, task: ArithmeticTask, settings: ProbeSettings, seed: int) -> dict:
    """P prompts x G sampled responses (T = 1), partial-credit rewards and group advantages."""
    rows = task.train_rows(settings.prompts)
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    prompts = [p for p in prompts for _ in range(settings.group_size)]
    engine = build_engine(Config(), model, tokenizer, None)  # the default engine (in-process, transformers)
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=1.0),
                              torch.Generator().manual_seed(seed))
    texts = [tokenizer.decode(c[m].tolist()) for c, m in zip(rollout.completion_ids, rollout.completion_mask)]
    answers = [r["answer"] for r in rows for _ in range(settings.group_size)]
    rewards = torch.tensor([partial_credit(t, a) for t, a in zip(texts, answers)])  # (B,)
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "completion_mask": rollout.completion_mask, "rewards": rewards,
            "advantages": group_advantages(rewards, settings.group_size)}


def volatility_by_depth(settings: ProbeSettings, log=print) -> list[dict]:
    """:func:`probe_volatility` for every depth and seed, in order."""
    results = []
    for depth in settings.depths:
        for seed in settings.seeds:
            result = probe_volatility(depth, seed, settings)
            shares = ", ".join(f"lr {lr}: {v['response']:.2%}" for lr, v in result["lrs"].items())
            log(f"volatility depth {depth} seed {seed}: experts changed on response tokens after one update ({shares})")
            results.append(result)
    return results
