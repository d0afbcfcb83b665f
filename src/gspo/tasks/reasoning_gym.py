"""reasoning-gym procedural tasks as a gspo :class:`Task`, scored by each task's own verifier.

``data.task=reasoning_gym:<name>`` (e.g. ``reasoning_gym:chain_sum``) generates rows locally with
reasoning-gym (the ``gspo[tasks]`` extra; nothing is downloaded). Dataset options follow a ``?``:
``reasoning_gym:chain_sum?min_terms=2&max_terms=3&max_digits=1`` (values parsed as YAML scalars).

- Training rows: an endless stream generated from the config seed, in chunks of :data:`CHUNK` rows
  (chunk ``c`` uses seed ``seed + c * CHUNK``; reasoning-gym seeds item ``i`` with ``seed + i``, so the
  chunks continue one sequence instead of repeating it).
- Held-out rows: ``eval_size`` rows generated from ``seed + EVAL_SEED_OFFSET``; a training row whose
  question is also a held-out question is skipped, so the two never share a problem.
- Reward ``verifier``: the task's ``score_answer(answer, entry)`` (1.0 right, 0.0 wrong, partial credit
  where the task defines it) on the answer extracted from the completion: the last
  ``<answer>...</answer>`` (reasoning-gym's convention; ask for it with ``data.system_prompt``), else
  the last ``\\boxed{...}``, else the whole completion.

Rows are ``{"prompt": question, "answer": reference, "entry": the reasoning-gym item}``; the verifier
needs the entry (its metadata), and every column reaches rewards as a keyword argument.
"""

from __future__ import annotations

import difflib
import itertools
import re
from typing import Any, Iterator

from gspo.errors import ConfigError
from gspo.tasks.answers import extract_answer
from gspo.tasks.base import Row, Task

CHUNK = 1000  # rows generated per dataset object; small enough that a dataset with eager generation stays cheap
EVAL_SEED_OFFSET = 2**31  # held-out seeds sit 2^31 items away from the training sequence
SEED_MODULUS = 2**32  # some generators seed numpy, which takes seeds below 2^32
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def reasoning_gym_task(spec: str, *, seed: int, eval_size: int) -> Task:
    """The reasoning-gym dataset ``spec`` (``name`` or ``name?key=value&...``) as a :class:`Task`."""
    rg = _require_reasoning_gym()
    name, options = parse_spec(spec)
    _check_name(name)

    def dataset(dataset_seed: int, size: int):
        try:
            return rg.create_dataset(name, seed=dataset_seed % SEED_MODULUS, size=size, **options)
        except (TypeError, ValueError, AssertionError) as exc:  # unknown option or out-of-range value
            raise ConfigError(f"data.task=reasoning_gym:{spec}: reasoning-gym rejected the options "
                              f"{options or '{}'} ({type(exc).__name__}: {exc})") from None

    scorer = dataset(seed, 1)  # score_answer may read the dataset's config, so score with the same options
    eval_rows = [_row(entry) for entry in dataset(seed + EVAL_SEED_OFFSET, eval_size)] if eval_size else []
    held_out = {row["prompt"] for row in eval_rows}

    def train_stream() -> Iterator[Row]:
        for chunk in itertools.count():
            for entry in dataset(seed + chunk * CHUNK, CHUNK):
                if entry["question"] not in held_out:
                    yield _row(entry)

    def verifier(prompt: str, completion: str, *, entry: dict[str, Any], **row) -> float:
        """reasoning-gym's own score for the answer in ``completion`` (see the module docstring)."""
        return float(scorer.score_answer(answer=extract_tagged_answer(completion), entry=entry))

    return Task(f"reasoning_gym:{spec}", train_stream, eval_rows, {"verifier": (verifier, 1.0)})


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"chain_sum?max_terms=3&max_digits=1"`` -> ``("chain_sum", {"max_terms": 3, "max_digits": 1})``."""
    import yaml

    name, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"data.task=reasoning_gym:{spec}: option '{item}' is not key=value; "
                              "write e.g. reasoning_gym:chain_sum?max_terms=3&max_digits=1")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key] = value
    return name, options


def extract_tagged_answer(completion: str) -> str:
    """The last ``<answer>...</answer>``, else the last ``\\boxed{...}``, else the stripped completion."""
    tagged = _ANSWER_TAG.findall(completion)
    return tagged[-1].strip() if tagged else extract_answer(completion)


def _row(entry: dict[str, Any]) -> Row:
    return {"prompt": entry["question"], "answer": entry["answer"], "entry": entry}


def _check_name(name: str) -> None:
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" It has {len(DATASETS)} tasks, e.g. chain_sum."
        raise ConfigError(f"data.task=reasoning_gym:{name}: reasoning-gym has no task '{name}'.{hint}")


def _require_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("data.task=reasoning_gym:... needs reasoning-gym: pip install 'gspo[tasks]'") from None
    return reasoning_gym
