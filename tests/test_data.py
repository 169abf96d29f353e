"""Data loading: bad rows are named by file and line (or row) before any training; content fingerprints."""

from __future__ import annotations

import json
import os

import datasets
import pytest

import te_llama.train.data as data
from te_llama.model.builtin import builtin_tokenizer
from te_llama.train.data import (
    DataError,
    DataReport,
    data_fingerprint,
    load_examples,
    load_rows,
)

GOOD = json.dumps({"text": "The sum of 1 and 2 is 3."})
HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
FIX = "fix them or pass --on-bad-rows skip to skip them"


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def write_lines(path, lines: list[str | bytes]) -> str:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return str(path)


def error_of(source: str, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_rows(source, **kwargs)
    return str(caught.value)


def test_null_text_names_the_file_and_line(tmp_path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD, '{"id": 7, "text": null}', GOOD])
    assert error_of(path) == (f"{path}: 1 bad row(s) (line 2); {FIX}:\n"
                              f"  {path}:2: field 'text' is null (row fields: ['id', 'text'])")


def test_a_row_missing_the_text_field_is_a_bad_row_and_can_be_skipped(tmp_path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, '{"body": "x"}', GOOD, '{"text": 5}'])
    assert error_of(path) == (f"{path}: 2 bad row(s) (line 3, 5); {FIX}:\n"
                              f"  {path}:3: no field 'text' (row fields: ['body'])\n"
                              f"  {path}:5: field 'text' is a number, not a string (row fields: ['text'])")
    report = DataReport()
    rows = load_rows(path, "skip", report)
    assert (rows.column_names, len(rows), report.malformed_skipped, report.rows) == (["text"], 3, 2, 3)


def test_no_row_with_the_text_field_is_a_wrong_text_field(tmp_path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"body": "a"}', "{not json", '{"body": "b", "id": 1}'])
    assert error_of(path) == (f"{path}: the data has no 'text' column (columns: ['body', 'id']); "
                              "pass --text-field NAME, or provide chat rows with 'messages'")
    assert load_rows(path, "skip", text_field="body")["body"] == ["a", "b"]


def test_non_utf8_bytes_name_the_file_line_and_column(tmp_path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD, b'{"text": "caf\xe9"}', GOOD, b"\xef\xbb\xbf" + GOOD.encode()])
    assert error_of(path) == (f"{path}: 2 malformed JSON line(s) (line 2, 4); {FIX}:\n"
                              f"  {path}:2: not UTF-8 (byte 0xe9 at column 14)\n"
                              f"  {path}:4: starts with a UTF-8 byte order mark (BOM), which only the file's "
                              "first line may")
    bom_first = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + GOOD.encode(), GOOD])
    assert len(load_rows(bom_first)) == 2


def test_parse_problems_are_listed_with_their_reasons(tmp_path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "{not json", '["a"]', '{"text": null}'] + ["[]"] * 10)
    message = error_of(path)
    assert message.startswith(f"{path}: 13 bad row(s) (line 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 ...); {FIX}:\n")
    lines = message.splitlines()[1:]
    assert len(lines) == data.MAX_SHOWN
    assert lines[:3] == [f"  {path}:2: not JSON (Expecting property name enclosed in double quotes at column 2)",
                         f"  {path}:3: not a JSON object (an array)",
                         f"  {path}:4: field 'text' is null (row fields: ['text'])"]


def test_chat_role_robot_is_refused_and_skipped_when_asked(tmp_path, tokenizer, caplog) -> None:
    robot = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": robot}), json.dumps({"messages": HELLO})])
    assert error_of(path) == (f"{path}: 1 bad row(s) (line 1); {FIX}:\n"
                              f"  {path}:1: message 2: role 'robot' is not one of system, user, assistant, tool")
    examples, report = load_examples(path, tokenizer, 64, None, on_bad_rows="skip")
    assert (len(examples), report.rows, report.malformed_skipped) == (1, 1, 1)
    assert f"{path}:1: message 2: role 'robot'" in caplog.text


@pytest.mark.parametrize(("row", "why"), [
    ({"messages": [{"role": "user", "content": None}]}, "message 1: content is null, not a string"),
    ({"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
    ({"messages": [{"content": "x"}]}, "message 1: role missing is not one of system, user, assistant, tool"),
    ({"messages": ["hi"]}, "message 1 is a string, not an object with 'role' and 'content'"),
    ({"messages": []}, "'messages' is an empty array, not a non-empty list of {role, content}"),
    ({"messages": "hi"}, "'messages' is a string, not a non-empty list of {role, content}"),
    ({"text": "plain"}, "no field 'messages' (row fields: ['text'])"),
])
def test_bad_chat_rows(tmp_path, row, why) -> None:
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": HELLO}), json.dumps(row)])
    assert error_of(path) == f"{path}: 1 bad row(s) (line 2); {FIX}:\n  {path}:2: {why}"


def test_dataset_dict_folder_needs_an_existing_split(tmp_path, tokenizer) -> None:
    folder = tmp_path / "saved"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([json.loads(GOOD)] * 3)}).save_to_disk(str(folder))
    expected = f"{folder}: no split 'train' (splits: validation); pass --data-split NAME to choose one"
    assert error_of(str(folder)) == expected
    with pytest.raises(DataError) as caught:
        load_examples(str(folder), tokenizer, 64, tmp_path / "cache")
    assert str(caught.value) == expected
    assert len(load_rows(str(folder), split="validation")) == 3
    examples, report = load_examples(str(folder), tokenizer, 64, tmp_path / "cache", split="validation")
    assert (len(examples), report.rows) == (3, 3)


def test_a_file_has_no_splits(tmp_path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    assert error_of(path, split="validation") == (
        f"{path} is a single file, which has no splits; --data-split 'validation' applies only to "
        "DatasetDict folders and hub datasets: leave it at 'train'")


def test_hub_dataset_without_the_split_lists_its_splits(monkeypatch) -> None:
    def load_dataset(name, split):
        raise ValueError(f'Unknown split "{split}". Should be one of [\'test\', \'validation\'].')

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: ["test", "validation"])
    assert error_of("someone/chats") == ("'someone/chats': no split 'train' (splits: test, validation); "
                                         "pass --data-split NAME to choose one")


def test_parquet_and_csv_name_the_row(tmp_path) -> None:
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a", "id": 1}, {"text": "b", "id": 2}, {"text": None, "id": 3}]).to_parquet(parquet)
    assert error_of(str(parquet)) == (f"{parquet}: 1 bad row(s) (row 3); {FIX}:\n"
                                      f"  {parquet}: row 3: field 'text' is null (row fields: ['text', 'id'])")
    csv = tmp_path / "d.csv"
    csv.write_text("text,id\nhello,1\n,2\nworld,3\n")  # row 2 (line 3): an empty cell reads as null
    assert error_of(str(csv)) == (f"{csv}: 1 bad row(s) (row 2); {FIX}:\n"
                                  f"  {csv}: row 2: field 'text' is null (row fields: ['text', 'id'])")
    report = DataReport()
    assert load_rows(str(csv), "skip", report)["text"] == ["hello", "world"]
    assert report.malformed_skipped == 1
    no_column = tmp_path / "body.csv"
    no_column.write_text("body\nhello\n")
    assert error_of(str(no_column)) == (f"{no_column}: the data has no 'text' column (columns: ['body']); "
                                        "pass --text-field NAME, or provide chat rows with 'messages'")


def test_parquet_chat_rows_are_checked_column_wise(tmp_path) -> None:
    parquet = tmp_path / "c.parquet"
    rows = [{"messages": HELLO}, {"messages": [{"role": "robot", "content": "beep"}]}, {"messages": HELLO},
            {"messages": [{"role": "user", "content": None}]}, {"messages": []}]
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    assert error_of(str(parquet)) == (
        f"{parquet}: 3 bad row(s) (row 2, 4, 5); {FIX}:\n"
        f"  {parquet}: row 2: message 1: role 'robot' is not one of system, user, assistant, tool\n"
        f"  {parquet}: row 4: message 1: content is null, not a string\n"
        f"  {parquet}: row 5: 'messages' is an empty array, not a non-empty list of {{role, content}}")
    assert load_rows(str(parquet), "skip")["messages"] == [HELLO, HELLO]


def edit_keeping_size_and_mtime(path, old: bytes, new: bytes) -> None:
    """Change bytes in place, then put size and mtime back: what an mtime-based cache cannot see."""
    stat = path.stat()
    content = path.read_bytes()
    assert len(old) == len(new) and content.count(old) == 1
    path.write_bytes(content.replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_fingerprint_follows_content_not_mtime(tmp_path, tokenizer) -> None:
    path = tmp_path / "d.jsonl"
    write_lines(path, [GOOD, json.dumps({"text": "A cat sat."})])
    first = data_fingerprint(str(path), tokenizer)
    assert first == data_fingerprint(str(path), builtin_tokenizer())  # stable across calls and instances
    assert set(first) == {"data", "tokenizer"} and len(first["data"]) == 64
    edit_keeping_size_and_mtime(path, b"cat", b"cot")
    edited = data_fingerprint(str(path), tokenizer)
    assert edited["data"] != first["data"] and edited["tokenizer"] == first["tokenizer"]

    templated = builtin_tokenizer()
    templated.chat_template = templated.chat_template + " "
    changed = data_fingerprint(str(path), templated)
    assert changed["tokenizer"] != edited["tokenizer"] and changed["data"] == edited["data"]


def test_folder_fingerprint_covers_content_and_split_but_not_map_caches(tmp_path, tokenizer) -> None:
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "A cat sat."}, {"text": "A cat ran."}]),
                          "validation": datasets.Dataset.from_list([{"text": "A dog ran."}])}).save_to_disk(str(folder))
    first = data_fingerprint(str(folder), tokenizer)
    load_examples(str(folder), tokenizer, 64, None)  # Dataset.map writes cache-*.arrow into the folder
    assert list(folder.rglob("cache-*.arrow"))
    assert data_fingerprint(str(folder), tokenizer) == first
    assert data_fingerprint(str(folder), tokenizer, split="validation")["data"] != first["data"]
    (arrow,) = (folder / "train").glob("data-*.arrow")
    edit_keeping_size_and_mtime(arrow, b"A cat sat.", b"A cot sat.")
    assert data_fingerprint(str(folder), tokenizer)["data"] != first["data"]


def test_missing_local_file_is_not_a_hub_name(tmp_path, tokenizer) -> None:
    with pytest.raises(DataError, match=r"^data/train.jsonl: no such file or folder$"):
        data_fingerprint("data/train.jsonl", tokenizer)


def test_tokenized_cache_is_not_reused_after_an_edit_with_the_same_mtime(tmp_path, tokenizer) -> None:
    path = tmp_path / "d.jsonl"
    write_lines(path, [json.dumps({"text": "A cat sat on the mat."})] * 2)
    cache = tmp_path / "cache"
    before, _ = load_examples(str(path), tokenizer, 64, cache)
    again, _ = load_examples(str(path), tokenizer, 64, cache)
    assert list(again["input_ids"]) == list(before["input_ids"]) and len(list(cache.glob("tokenized-*"))) == 1
    edit_keeping_size_and_mtime(path, b"A cat sat on the mat.\"}\n{", b"A dog sat on the mat.\"}\n{")
    after, _ = load_examples(str(path), tokenizer, 64, cache)
    fresh, _ = load_examples(str(path), tokenizer, 64, None)
    assert list(after["input_ids"]) == list(fresh["input_ids"]) != list(before["input_ids"])
    assert len(list(cache.glob("tokenized-*"))) == 2


def test_rows_whose_values_cannot_form_one_table(tmp_path) -> None:
    turns = [[{"role": "user", "content": "a", "name": 1}], [{"role": "user", "content": "b", "name": "x"}]]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": t}) for t in turns])
    assert error_of(path).startswith(f"{path}: the rows' 'messages' values do not share one structure (")
    assert error_of(path).endswith("); give every row the same keys and value types")
