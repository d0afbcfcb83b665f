"""A reward for code tasks: run the completion's program on test inputs in the sandbox."""

from __future__ import annotations

import re
from typing import Sequence

from gspo.errors import RewardError
from gspo.sandbox.run import run_sandboxed

FENCED_BLOCK = re.compile(r"```[^\n`]*\n(.*?)```", re.S)  # ```python\n...``` (any or no language tag)


def extract_code(completion: str) -> str:
    """The last fenced code block of a completion, or the whole text if it has none."""
    blocks = FENCED_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def code_output_reward(prompt: str, completion: str, *, tests: Sequence[Sequence[str]], timeout_s: float = 5.0,
                       memory_mb: int = 512, **row) -> float:
    """The fraction of ``(stdin, expected_stdout)`` tests the completion's program passes, in [0, 1].

    Follows the reward signature ``(prompt, completion, **row)``: put ``tests`` in the dataset row.
    The program is the completion's last fenced code block; outputs are compared line by line,
    ignoring trailing whitespace. A crash, timeout or wrong output fails that test; nothing raises
    except a row without tests.
    """
    if not tests:
        raise RewardError("code_output_reward got no tests; give each row a 'tests' list of "
                          "[stdin, expected_stdout] pairs")
    code = extract_code(completion)
    passed = 0
    for stdin, expected in tests:
        result = run_sandboxed(code, stdin=stdin, timeout_s=timeout_s, memory_mb=memory_mb)
        passed += result.ok and _lines(result.stdout) == _lines(expected)
    return passed / len(tests)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]
