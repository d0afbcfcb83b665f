"""Generic answer rewards for datasets with a reference ``answer`` column."""

from __future__ import annotations

import importlib.util
import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(completion: str) -> str:
    """The final answer in a completion: the last \\boxed{...}, else the text after '####', else it all."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1].strip()
    if "####" in completion:
        return completion.rsplit("####", 1)[1].strip()
    return completion.strip()


def exact_match_reward(prompt: str, completion: str, **row) -> float:
    """1.0 iff the extracted answer equals the reference answer (whitespace-insensitive)."""
    return float("".join(extract_answer(completion).split()) == "".join(str(row["answer"]).split()))


def last_number_reward(prompt: str, completion: str, **row) -> float | None:
    """1.0 iff the last number in the completion equals the reference; None when there is no number."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return None
    try:
        return float(float(numbers[-1]) == float(str(row["answer"]).replace(",", "")))
    except ValueError:
        return 0.0


def math_verify_reward(prompt: str, completion: str, **row) -> float | None:
    """1.0 iff math-verify finds the completion's answer equal to the reference, else 0.0.

    Equivalent forms match (``\\boxed{\\frac{1}{2}}``, ``$1/2$``, ``0.5``; ``x^2+1`` vs ``1+x^2``): both sides are
    parsed to sympy (LaTeX, boxed or plain expressions) and compared symbolically. None when the completion
    holds no parsable answer. Needs math-verify (the ``gspo[tasks]`` extra).
    """
    from math_verify import parse, verify

    gold = parse(str(row["answer"])) or parse(f"${row['answer']}$")
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {row['answer']!r}")
    predicted = parse(completion)
    if not predicted:
        return None
    return float(verify(gold, predicted))


ANSWER_REWARDS = {"exact_match": (exact_match_reward, 1.0), "last_number": (last_number_reward, 0.0)}
if importlib.util.find_spec("math_verify") is not None:  # optional: the gspo[tasks] extra
    ANSWER_REWARDS["math_verify"] = (math_verify_reward, 0.0)

# Rewards that exist when an extra is installed: the hint resolve_rewards gives when one is asked for without it.
OPTIONAL_REWARDS = {"math_verify": "math-verify: pip install 'gspo[tasks]'"}
