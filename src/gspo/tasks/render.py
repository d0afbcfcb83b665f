"""Rows -> prompt token ids, and completion token ids -> text, for one tokenizer."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gspo.errors import ConfigError, DataError
from gspo.tasks.base import Row, Task

PROMPT_SCAN_ROWS = 1024  # training rows rendered to measure the prompts (with the held-out rows)
PROMPT_HEADROOM = 2  # a measured cap is this many times the longest prompt seen
PROMPT_ROUNDING = 256


def _single_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` with a doubled leading BOS (a template that writes BOS, tokenized with BOS added) made one."""
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


@dataclass
class PromptRenderer:
    """Renders a row's prompt with the tokenizer's chat template (when it has one) or as plain text.

    The prompt's token ids are the ones the model was trained to continue: plain text is encoded with
    the tokenizer's own special tokens (a base model's BOS, exactly once, never a trailing EOS); a chat
    template's output is used as the template wrote it (its BOS, if it writes one, once).

    ``max_prompt_tokens``: prompts longer than this (the context minus the generation budget) are an
    error naming the row, rather than a silently truncated prompt.
    """

    tokenizer: object
    system_prompt: str = ""
    chat_template: str = "auto"  # auto | always | never
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat_template == "always" and not has_template:
            raise ConfigError("data.chat_template=always but the tokenizer has no chat template; "
                              "use data.chat_template=auto or a tokenizer that ships one")
        self.use_template = has_template and self.chat_template != "never"

    def __call__(self, row: Row) -> list[int]:
        prompt = row["prompt"]
        if self.use_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if self.system_prompt and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = _single_bos(list(ids), self.tokenizer.bos_token_id)
        else:
            if not isinstance(prompt, str):
                raise DataError("a prompt is a list of chat messages but the tokenizer has no chat template; "
                                "use plain-text prompts or a tokenizer with a chat template")
            text = f"{self.system_prompt}\n{prompt}" if self.system_prompt else prompt
            ids = self._encode_plain(text)
        ids = list(ids)
        if not ids:
            raise DataError(f"prompt {prompt!r:.60} encodes to no tokens")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise DataError(
                f"prompt {str(prompt)[:60]!r} has {len(ids)} tokens but at most {self.max_prompt_tokens} fit "
                "(data.max_prompt_tokens, at most the model's context minus rollout.max_new_tokens); shorten it, "
                "filter the dataset, raise data.max_prompt_tokens or lower rollout.max_new_tokens"
            )
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Plain text as the model saw text in pre-training: with the tokenizer's own special tokens
        (a base model's BOS), but never an EOS that some tokenizers append (the prompt must not end)."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        bare = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if len(ids) > len(bare) and ids[-1] == eos and (not bare or bare[-1] != eos):
            ids = ids[:-1]
        return _single_bos(ids, self.tokenizer.bos_token_id)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def prompt_lengths(task: Task, render: PromptRenderer, rows: int = PROMPT_SCAN_ROWS) -> list[int]:
    """Token counts of the held-out prompts and of the first ``rows`` training prompts."""
    sample = list(task.eval_rows) + list(itertools.islice(task.train_stream(), rows))
    return [len(render(row)) for row in sample]


def prompt_token_cap(configured: int, *, context: int | None, max_new_tokens: int,
                     lengths: list[int] | None = None) -> int:
    """``data.max_prompt_tokens`` as the run uses it (0: no cap known).

    Set (> 0): itself, if it and ``max_new_tokens`` fit ``context``. Auto with measured ``lengths``:
    ``PROMPT_HEADROOM`` times the longest, rounded up to ``PROMPT_ROUNDING``; else (and at most) the context
    minus the generation budget.
    """
    room = context - max_new_tokens if context else None
    if configured > 0:
        if room is not None and configured > room:
            raise ConfigError(f"data.max_prompt_tokens={configured} plus rollout.max_new_tokens={max_new_tokens} "
                              f"exceeds the model's context ({context} tokens); lower one of them")
        return configured
    if lengths:
        measured = -(-max(lengths) * PROMPT_HEADROOM // PROMPT_ROUNDING) * PROMPT_ROUNDING
        return min(measured, room) if room is not None else measured
    return room or 0
