"""Load prompt datasets from local files: JSONL / JSON / CSV / Parquet, or a saved HF dataset directory.

JSONL and CSV need nothing beyond the standard library; Parquet and ``save_to_disk`` directories use
Hugging Face ``datasets`` (the ``gspo[datasets]`` extra). Nothing is downloaded. Columns are mapped
to ``prompt`` / ``answer`` so rewards see the same names whatever the file calls them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from gspo.errors import DataError
from gspo.tasks.base import Row

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_rows(
    path: str | Path, *, prompt_column: str = "prompt", answer_column: str = "answer", require_answer: bool = False
) -> list[Row]:
    """Rows of a local dataset with ``prompt`` (and ``answer``) mapped from the named columns.

    ``require_answer``: every row must have the answer column (rewards that compare to a reference).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset '{path}' does not exist; set data.path to a local {'/'.join(SUFFIXES)} file "
                        "or a directory written by datasets' save_to_disk")
    return rows_from_records(_read(path), path, prompt_column=prompt_column, answer_column=answer_column,
                             require_answer=require_answer)


def rows_from_records(raw: list[dict[str, Any]], source, *, prompt_column: str = "prompt",
                      answer_column: str = "answer", require_answer: bool = False) -> list[Row]:
    """Rows from in-memory records (dicts), checked and mapped like a file's; ``source`` names them in errors."""
    if not raw:
        raise DataError(f"dataset '{source}' has no rows; add rows or point data.path at another file")
    for i, row in enumerate(raw):
        if not isinstance(row, dict):
            raise DataError(f"dataset '{source}' row {i} must be a mapping of columns to values, got {row!r:.60}")
    rows = [_map_columns(row, i, source, prompt_column, answer_column) for i, row in enumerate(raw)]
    missing = next((i for i, row in enumerate(rows) if "answer" not in row), None)
    if require_answer and missing is not None:
        columns = ", ".join(map(str, raw[missing]))
        raise DataError(
            f"dataset '{source}' row {missing} has no column '{answer_column}' (columns: {columns}); "
            "set data.answer_column to the column with the reference answer, or use rewards that need none"
        )
    return rows


def _read(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        return _read_hf_directory(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:  # -sig: tolerate the byte-order mark some editors write
                return [_json_object(line, path, n) for n, line in enumerate(f, 1) if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict) and "data" in data:
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"'{path}': a .json dataset must be a list of objects (or use .jsonl)")
            return data
        if suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            return _require_datasets(path).load_dataset("parquet", data_files=str(path), split="train").to_list()
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not UTF-8 text ({exc}); convert it or use Parquet") from None
    except csv.Error as exc:
        raise DataError(f"'{path}' is not valid CSV: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}' is not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"'{path}' nests JSON too deeply to read; flatten its records") from None
    raise DataError(f"'{path}': unsupported dataset format '{suffix}'; use one of {', '.join(SUFFIXES)}")


def _json_object(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"'{path}' line {number} is not valid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise DataError(f"'{path}' line {number} must be a JSON object with a prompt column, got {row!r:.60}")
    return row


def _read_hf_directory(path: Path) -> list[dict[str, Any]]:
    datasets = _require_datasets(path)
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"'{path}' is not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        data = data[split]
    return data.to_list()


def _require_datasets(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading '{path}' needs Hugging Face datasets: pip install 'gspo[datasets]'") from None
    return datasets


def _map_columns(row: dict[str, Any], index: int, path: Path, prompt_column: str, answer_column: str) -> Row:
    if prompt_column not in row:
        raise DataError(
            f"dataset '{path}' row {index} has no column '{prompt_column}' (columns: {', '.join(map(str, row))}); "
            "set data.prompt_column to the column that holds the prompt"
        )
    prompt = row[prompt_column]
    if not isinstance(prompt, (str, list)) or not prompt:
        raise DataError(f"dataset '{path}' row {index}: '{prompt_column}' must be a non-empty string or a list "
                        f"of chat messages, got {prompt!r:.60}")
    if isinstance(prompt, list) and not all(_is_message(m) for m in prompt):
        raise DataError(f"dataset '{path}' row {index}: '{prompt_column}' is a list but not of chat messages "
                        f"({{'role': str, 'content': str}}), got {prompt!r:.60}; use a string or such messages")
    mapped = {k: v for k, v in row.items() if k not in (prompt_column,)}
    mapped["prompt"] = prompt
    if answer_column in row:
        mapped["answer"] = row[answer_column]
    return mapped


def _is_message(message: Any) -> bool:
    return (isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str))
