"""Generic answer rewards for datasets with a reference ``answer`` column."""

from __future__ import annotations

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


ANSWER_REWARDS = {"exact_match": (exact_match_reward, 1.0), "last_number": (last_number_reward, 0.0)}
