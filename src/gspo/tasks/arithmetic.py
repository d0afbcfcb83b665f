"""The embedded task: integer addition (optionally mixed with subtraction), answer digits then EOS.

A row is ``{"prompt": "37+48=", "answer": "85"}``; the model must write the answer and emit ``<eos>``.
Each operand gets a digit count drawn uniformly from 1..``max_digits`` and is then uniform among the
numbers with that many digits, so a batch mixes easy sums (which a small model gets right) with
carry-heavy 3-digit sums (which it gets partly right): that spread is what gives GSPO groups whose
rewards differ.

Train / held-out split: an operand pair belongs to the held-out split iff a stable hash of
``(op, a, b, split_salt)`` falls in the lowest ``heldout_fraction`` of its range. The split depends
only on the salt, never on ``seed``, so every seed agrees on what is held out; ``seed`` only orders the
rows. Pure Python: no torch, no tokenizer.

Rewards are plain callables ``reward(prompt, completion, **columns) -> float`` where ``columns`` are the
row's fields other than ``prompt`` (here just ``answer``), as in TRL's reward-function convention.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from gspo.tasks.base import first_distinct

EOS_TEXT = "<eos>"  # the tokenizer's EOS string (gspo.models.tiny.EOS_TOKEN), if the trainer decodes it
PAD_TEXT = "<pad>"
_INTEGER = re.compile(r"-?\d+")
_HASH_RANGE = 2**64
_EVAL_STREAM = 1_000_003  # offsets the eval RNG from the train RNG so the two streams are unrelated


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition (and optionally subtraction) of integers with up to ``max_digits`` digits."""

    seed: int = 0
    max_digits: int = 3  # operands have 1..max_digits digits (digit count uniform, then value uniform)
    subtraction_fraction: float = 0.0  # share of rows that are "a-b=" (answer may be negative)
    heldout_fraction: float = 0.1  # share of operand pairs reserved for evaluation
    split_salt: str = "gspo-arith-v1"  # changing it changes the split (and invalidates checkpoints' evals)

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 6:
            raise ValueError(f"max_digits must be in 1..6, got {self.max_digits}")
        if not 0.0 <= self.subtraction_fraction <= 1.0:
            raise ValueError(f"subtraction_fraction must be in [0, 1], got {self.subtraction_fraction}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    # -- splits ------------------------------------------------------------------------------------
    def is_heldout(self, op: str, a: int, b: int) -> bool:
        """True iff the problem ``a op b`` belongs to the held-out split."""
        key = f"{self.split_salt}|{op}|{a}|{b}".encode()
        h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return h < self.heldout_fraction * _HASH_RANGE

    def iter_train(self) -> Iterator[dict]:
        """An infinite, seed-deterministic stream of training rows (never a held-out problem)."""
        return self._stream(random.Random(self.seed), heldout=False)

    def train_rows(self, n: int) -> list[dict]:
        """The first ``n`` rows of :meth:`iter_train` (repeats are possible: easy problems are few)."""
        stream = self.iter_train()
        return [next(stream) for _ in range(n)]

    def eval_rows(self, n: int) -> list[dict]:
        """``n`` distinct held-out rows, deterministic in ``seed``, disjoint from every training row."""
        return first_distinct(self._stream(random.Random(self.seed + _EVAL_STREAM), heldout=True), n)

    # -- sampling ----------------------------------------------------------------------------------
    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(1, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def _stream(self, rng: random.Random, *, heldout: bool) -> Iterator[dict]:
        while True:
            op = "-" if rng.random() < self.subtraction_fraction else "+"
            a, b = self._operand(rng), self._operand(rng)
            if self.is_heldout(op, a, b) == heldout:
                yield make_row(op, a, b)


def make_row(op: str, a: int, b: int) -> dict:
    """The row for ``a op b``: prompt ``"a+b="`` and the exact integer answer as a string."""
    value = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "answer": str(value)}


def _answer_text(completion: str) -> str:
    """The completion up to its first EOS, with padding and surrounding whitespace removed."""
    return completion.split(EOS_TEXT, 1)[0].replace(PAD_TEXT, "").strip()


def exact_answer_reward(prompt: str, completion: str, **row) -> float:
    """1.0 iff the completion (EOS / whitespace stripped) is exactly ``row["answer"]``, else 0.0."""
    return float(_answer_text(completion) == row["answer"])


def format_reward(prompt: str, completion: str, **row) -> float:
    """1.0 iff the completion (EOS / whitespace stripped) is an integer: digits, optional leading '-'."""
    return float(_INTEGER.fullmatch(_answer_text(completion)) is not None)


REWARDS = {"exact_answer": exact_answer_reward, "format": format_reward}
