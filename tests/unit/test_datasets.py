"""Loading local datasets: every supported format, column mapping, and bad files -> DataError only."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gspo.errors import DataError
from gspo.tasks.datasets import load_rows

ROWS = [{"prompt": "1+1=", "answer": "2", "level": 1}, {"prompt": "2+3=", "answer": "5", "level": 2}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_jsonl_keeps_every_column(tmp_path):
    assert load_rows(write_jsonl(tmp_path / "d.jsonl", ROWS)) == ROWS


def test_json_list_and_data_wrapper(tmp_path):
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS}))
    assert load_rows(plain) == load_rows(wrapped) == ROWS


def test_csv_values_are_strings(tmp_path):
    rows = load_rows(write_csv(tmp_path / "d.csv", ROWS))
    assert rows == [{k: str(v) for k, v in r.items()} for r in ROWS]


def test_a_byte_order_mark_is_tolerated(tmp_path):
    """Spreadsheet exports start with a BOM; it must not become part of the first column's name."""
    rows = load_rows(write_csv(tmp_path / "bom.csv", ROWS, encoding="utf-8-sig"))
    assert rows[0]["prompt"] == "1+1="
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", ROWS).read_bytes())
    assert load_rows(jsonl) == ROWS


def test_column_mapping(tmp_path):
    rows = [{"question": "q1", "solution": "s1"}, {"question": "q2", "solution": "s2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    rows = load_rows(path, prompt_column="question", answer_column="solution", require_answer=True)
    assert [(r["prompt"], r["answer"]) for r in rows] == [("q1", "s1"), ("q2", "s2")]
    assert "question" not in rows[0]  # the prompt is only under its canonical name


def test_answer_required_names_the_row_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "solution": "2"}])
    assert len(load_rows(path)) == 2  # not required: rows without an answer are fine
    with pytest.raises(DataError, match=r"row 1 has no column 'answer'.*data\.answer_column"):
        load_rows(path, require_answer=True)


def test_chat_message_prompts(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    assert load_rows(write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages}]))[0]["prompt"] == messages
    with pytest.raises(DataError, match="not of chat messages"):
        load_rows(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [1, 2]}]))


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.jsonl", "", "has no rows"),
    ("blank.jsonl", "\n  \n", "has no rows"),
    ("header.csv", "prompt,answer\n", "has no rows"),
    ("empty.json", "[]", "has no rows"),
    ("noprompt.jsonl", '{"question": "q"}\n', "no column 'prompt'"),
    ("emptyprompt.jsonl", '{"prompt": ""}\n', "non-empty string"),
    ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("scalar.jsonl", '"just text"\n', "line 1 must be a JSON object"),
    ("object.json", '{"prompt": "a"}', "list of objects"),
    ("table.txt", "prompt\na\n", "unsupported dataset format"),
])
def test_bad_files_name_the_problem(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        load_rows(path)


def test_missing_path_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_rows(latin)


def test_parquet_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(tmp_path / "d.parquet") == ROWS
    table.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "saved") == ROWS
    datasets.DatasetDict({"test": table.select([0]), "train": table}).save_to_disk(str(tmp_path / "splits"))
    assert load_rows(tmp_path / "splits") == ROWS  # the train split when there is one
    (tmp_path / "not-a-dataset").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_rows(tmp_path / "not-a-dataset")


# -- fuzzing: whatever the bytes, the loader returns valid rows or raises DataError -------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": st.text(max_size=5)}),
                            max_size=2))
RECORDS = st.lists(st.dictionaries(st.sampled_from(["prompt", "answer", "question", "", "x"]), VALUES, max_size=4),
                   max_size=4)


def _render(records: list, suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if suffix == ".json":
        return json.dumps(records).encode()
    keys = sorted({k for r in records for k in r}) or ["prompt"]
    lines = [",".join(keys)] + [",".join(json.dumps(r.get(k, ""))[:20] for k in keys) for r in records]
    return "\n".join(lines).encode()


@st.composite
def dataset_bytes(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    kind = draw(st.sampled_from(["bytes", "text", "records", "truncated"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=200))
    if kind == "text":
        return suffix, draw(st.text(alphabet=st.sampled_from('{}[]",:\n\r\x00 prompt\xe9\ufeff'), max_size=80)).encode()
    data = _render(draw(RECORDS), suffix)
    if kind == "truncated" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return suffix, data


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset_bytes())
def test_fuzzed_files_load_or_raise_data_error(tmp_path, case):
    suffix, data = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        rows = load_rows(path, require_answer=False)
    except DataError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert rows
    for row in rows:
        prompt = row["prompt"]
        assert (isinstance(prompt, str) and prompt) or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt))


def test_the_default_held_out_rows_are_a_seeded_sample_not_the_files_end(tmp_path):
    """Ordered rows (a=0..99, as the README's API example writes them): holding out the last rows would train on
    a=0..79 and measure a=80..99. The held-out rows are a seeded random sample, disjoint from the training rows."""
    from gspo.config.schema import DataConfig
    from gspo.tasks.registry import build_task

    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(100)]
    data = DataConfig(path=str(write_jsonl(tmp_path / "ordered.jsonl", rows)))
    task = build_task(data, seed=0, eval_size=20)
    held = [int(r["prompt"].split("+")[0]) for r in task.eval_rows]
    trained = {r["prompt"] for r in itertools.islice(task.train_stream(), 80)}
    assert len(held) == 20 and held == sorted(held) and held != list(range(80, 100))
    assert min(held) < 50 < max(held)  # spread over the file, not one end of it
    assert trained.isdisjoint(r["prompt"] for r in task.eval_rows) and len(trained) == 80
    again = build_task(data, seed=0, eval_size=20)
    assert [r["prompt"] for r in again.eval_rows] == [r["prompt"] for r in task.eval_rows]
    assert build_task(data, seed=1, eval_size=20).eval_rows != task.eval_rows  # the seed draws it
    assert "random" in task.note and "data.eval_path" in task.note
    given = build_task(DataConfig(path=data.path, eval_path=str(write_jsonl(tmp_path / "held.jsonl", rows[-5:]))),
                       seed=0, eval_size=20)
    assert given.eval_rows == rows[-5:]  # data.eval_path: those rows, as given
