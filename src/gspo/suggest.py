"""The closest valid name to a typo ("did you mean ...?") for commands, config keys and values.

``difflib`` ranks by matching blocks and so prefers ``gspo`` over ``grpo`` for ``gpro`` (one
swapped pair of letters is the commonest typo). The distance here is Damerau-Levenshtein in its
optimal-string-alignment form: insertions, deletions, substitutions and adjacent transpositions
each cost 1. Imports nothing beyond the standard library, so every typo is answered without torch.
"""

from __future__ import annotations

import difflib
from typing import Iterable


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance between ``a`` and ``b`` (a transposition costs 1)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def closest(word: str, options: Iterable[str], *, max_distance: int | None = None) -> str | None:
    """The option nearest to ``word``, or None when nothing is plausibly meant.

    Plausible: at most ``max_distance`` edits (default: a third of the word's length, at least 1), or
    failing that a difflib ratio of 0.75 (a long name with a short piece missing). Ties go to the
    option that shares the longer prefix, then the closer length, then the first listed.
    """
    options = [str(o) for o in options]
    if not options:
        return None
    text = str(word)
    limit = max(1, len(text) // 3) if max_distance is None else max_distance
    folded = text.lower()

    def rank(indexed: tuple[int, str]) -> tuple:
        index, option = indexed
        return (edit_distance(folded, option.lower()), -_common_prefix(folded, option.lower()),
                abs(len(option) - len(text)), index)

    index, best = min(enumerate(options), key=rank)
    if edit_distance(folded, best.lower()) <= limit:
        return best
    near = difflib.get_close_matches(text, options, n=1, cutoff=0.75)
    return near[0] if near else None


def did_you_mean(word: str, options: Iterable[str], **kwargs) -> str:
    """`` Did you mean 'x'?`` for the closest option, or an empty string."""
    match = closest(word, options, **kwargs)
    return f" Did you mean '{match}'?" if match is not None else ""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# TRL's GRPOConfig names -> the gspo config key closest in meaning: "did you mean" for a TRL name typed into
# gspo's config, and the one-to-one part of gspo.trl's mapping (gspo/trl/mapping.py; docs/trl.md spells out
# where the semantics differ: TRL's step is an optimizer step, a gspo step a rollout batch).
TRL_KEYS = {
    "num_generations": "rollout.group_size",
    "max_completion_length": "rollout.max_new_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "top_k": "rollout.top_k",
    "per_device_train_batch_size": "rollout.prompts_per_step",
    "generation_batch_size": "rollout.prompts_per_step",
    "steps_per_generation": "optim.minibatches",
    "gradient_accumulation_steps": "optim.micro_batch_size",
    "num_iterations": "optim.epochs",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm",
    "warmup_steps": "optim.warmup_steps",
    "lr_scheduler_type": "optim.schedule",
    "bf16": "optim.dtype",
    "gradient_checkpointing": "optim.gradient_checkpointing",
    "epsilon": "loss.clip_low",
    "epsilon_high": "loss.clip_high",
    "beta": "loss.beta",
    "scale_rewards": "loss.advantage_scale",
    "ref_model_sync_steps": "loss.ref_refresh_steps",
    "loss_type": "algorithm",
    "importance_sampling_level": "algorithm",
    "max_steps": "steps",
    "output_dir": "run_dir",
    "logging_steps": "log.every",
    "report_to": "log.trackers",
    "save_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep_last",
    "eval_steps": "eval.every",
    "num_generations_eval": "eval.samples",
    "reward_weights": "reward.functions",
    "use_vllm": "rollout.engine",
    "vllm_mode": "rollout.engine",
    "vllm_server_base_url": "rollout.server_url",
    "vllm_gpu_memory_utilization": "rollout.vllm_gpu_memory",
}


def trl_hint(key: str) -> str:
    """`` Did you mean 'rollout.group_size' (TRL's num_generations)?`` when ``key`` ends in a TRL name, else ''."""
    leaf = str(key).rsplit(".", 1)[-1]
    if leaf not in TRL_KEYS:
        return ""
    return f" Did you mean '{TRL_KEYS[leaf]}' (TRL's {leaf})? docs/trl.md maps every TRL option."
