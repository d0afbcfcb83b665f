"""The embedded agent task: multi-digit multiplication with a calculator tool (``data.task=calculator``).

A row is ``{"prompt": "347*28=", "answer": "9716"}``. The ~1M-parameter model cannot multiply a
3-digit number by a 2-digit one in one pass (answering directly it is right on about 1-3% of held-out
products), but it can copy: a Qwen3-style tool call
``<tool_call>{"name":"calc","arguments":{"expr":"347*28"}}</tool_call>``, then, after the tool's
``<tool_response>9716</tool_response>``, the answer ``9716`` and EOS. So the tool really helps.

The warm start (``gspo sft model=tiny-calc``, :func:`warm_start_calculator`) is trained on
demonstrations of both behaviours, as a model that sometimes answers from memory: a share
``tool_fraction`` of them call the tool, the others write the product at once. Trained on these,
the model calls the tool in about that share of its sampled episodes, so RL has something to learn:
that calling the tool pays, and writing well-formed calls and copying their result exactly.
Demonstrations go through the same environment and :class:`~gspo.agents.format.MessageFormat` as
training, with the loss on the model's tokens only (the environment's tokens are context).

Train / held-out split as in :mod:`gspo.tasks.arithmetic`: a stable hash of the operands, independent
of the seed. The tokenizer is the embedded character tokenizer extended with lowercase letters, JSON
punctuation and the four tool tags as single tokens.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
from collections.abc import Iterator
from dataclasses import dataclass

from gspo.agents.env import ToolEnvironment
from gspo.agents.tools import Tool
from gspo.tasks.arithmetic import exact_answer_reward
from gspo.tasks.base import first_distinct

TOOL_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
CALC_ALPHABET = "0123456789+-*= abcdefghijklmnopqrstuvwxyz{}[]\":,._'()/<>!?"
CONTEXT = 96  # the model's positions: prompt (<= 7) + tool call (<= 47) + answer (<= 7) + an error message
MAX_TURN_TOKENS = 48  # a tool call is at most 46 tokens with its EOS
MAX_MESSAGE_CHARS = 24  # "error: malformed tool ca": enough to tell an error from a result
_HASH_RANGE = 2**64
_EVAL_STREAM = 1_000_003


def calc(expr: str) -> int:
    """Evaluate an integer arithmetic expression.

    Args:
        expr: integers with +, - and *, e.g. "347*28".
    """
    return _evaluate(ast.parse(expr.strip(), mode="eval").body)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    raise ValueError("only integers with + - * are allowed")


def calculator_environment(*, max_turns: int = 3, timeout_s: float = 1.0) -> ToolEnvironment:
    """The calculator environment; tool answers are clipped to MAX_MESSAGE_CHARS to fit the tiny context."""
    return ToolEnvironment([Tool.from_function(calc, timeout_s=timeout_s)], max_turns=max_turns,
                           max_message_chars=MAX_MESSAGE_CHARS)


@dataclass(frozen=True)
class CalculatorTask:
    """Products ``a*b`` with ``a`` of 2..3 digits and ``b`` of 1..2 digits."""

    seed: int = 0
    heldout_fraction: float = 0.1
    split_salt: str = "gspo-calc-v1"

    def is_heldout(self, a: int, b: int) -> bool:
        h = int.from_bytes(hashlib.blake2b(f"{self.split_salt}|{a}|{b}".encode(), digest_size=8).digest(), "little")
        return h < self.heldout_fraction * _HASH_RANGE

    def iter_train(self) -> Iterator[dict]:
        return self._stream(random.Random(self.seed), heldout=False)

    def eval_rows(self, n: int) -> list[dict]:
        return first_distinct(self._stream(random.Random(self.seed + _EVAL_STREAM), heldout=True), n)

    def _stream(self, rng: random.Random, *, heldout: bool) -> Iterator[dict]:
        while True:
            a = rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999)
            b = rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(10, 99)
            if self.is_heldout(a, b) == heldout:
                yield {"prompt": f"{a}*{b}=", "answer": str(a * b)}


def build_calc_tokenizer():
    """The character tokenizer of :mod:`gspo.models.tiny`, plus letters, JSON punctuation and the tool tags
    as single ordinary tokens (kept by ``decode(skip_special_tokens=True)``, as Qwen3 keeps them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gspo.models.tiny import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + TOOL_TAGS + tuple(CALC_ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tags = "|".join(t.replace("/", "\\/") for t in TOOL_TAGS)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{tags}|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, padding_side="left", clean_up_tokenization_spaces=False,
                                   model_max_length=CONTEXT)


def tool_call_text(row: dict) -> str:
    """The demonstrated tool call for ``row`` (compact JSON, as the tiny model writes it)."""
    return '<tool_call>{"name":"calc","arguments":{"expr":"' + row["prompt"].rstrip("=") + '"}}</tool_call>'


def build_task(*, seed: int, eval_size: int):
    """The :class:`~gspo.tasks.base.Task` for ``data.task=calculator`` (with its environment)."""
    from gspo.tasks.base import Task

    task = CalculatorTask(seed=seed)
    return Task("calculator", task.iter_train, task.eval_rows(eval_size),
                {"exact_answer": (exact_answer_reward, 1.0)}, environment=calculator_environment(),
                note="agent task: multiplication with a calc tool (<tool_call> JSON), reward on the final answer")
