"""Training rows: read the user's files, folders or hub datasets, and check every row.

Rows are plain text (`text_field`) or chat (`messages`: list of {role, content}). Every row is
checked before any tokenizing, so bad data fails at start naming the file and the line (JSONL)
or row, or is skipped and counted with `--on-bad-rows skip`. `load_rows` returns one column of
usable rows; `te_llama.train.data` tokenizes them.
"""

from __future__ import annotations

import codecs
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import TeLlamaError

logger = logging.getLogger(__name__)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
BAD_ROW_CHOICES = ("fail", "skip")
MAX_SHOWN = 10  # bad rows listed in an error; the count covers the rest


class DataError(TeLlamaError, ValueError):
    """The training data cannot be used as given (the message says what and how to fix it)."""


@dataclass
class DataReport:
    """What loading and tokenizing did to the rows; shown to the user and saved with the run."""

    rows: int = 0
    malformed_skipped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_empty: int = 0
    tokens: int = 0


# ---- row checks: one definition of a usable row, shared by every source and by tokenizing

def _json_type(value: Any) -> str:
    """A value's type in JSON's words, for messages about rows."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _a(value: Any) -> str:
    """'null', 'a number', 'an array': a value's JSON type with its article."""
    kind = _json_type(value)
    return kind if value is None else ("an " if kind[0] in "aeiou" else "a ") + kind


def text_problem(row: dict, text_field: str) -> str | None:
    """Why a plain-text row cannot be trained on, or None."""
    fields = f"(row fields: {list(row)})"
    if text_field not in row:
        return f"no field {text_field!r} {fields}"
    value = row[text_field]
    if value is None:
        return f"field {text_field!r} is null {fields}"
    if not isinstance(value, str):
        return f"field {text_field!r} is {_a(value)}, not a string {fields}"
    return None


def chat_problem(row: dict) -> str | None:
    """Why a chat row cannot be rendered with a chat template, or None."""
    if "messages" not in row:
        return f"no field 'messages' (row fields: {list(row)})"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        kind = "an empty array" if isinstance(messages, list) else _a(messages)
        return f"'messages' is {kind}, not a non-empty list of {{role, content}}"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {number} is {_a(message)}, not an object with 'role' and 'content'"
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            shown = "missing" if "role" not in message else repr(role)
            return f"message {number}: role {shown} is not one of {', '.join(ROLES)}"
        if "content" not in message:
            return f"message {number} has no 'content'"
        if not isinstance(message["content"], str):
            return f"message {number}: content is {_a(message['content'])}, not a string"
    return None


def _row_problem(row: dict, text_field: str, chat: bool) -> str | None:
    return chat_problem(row) if chat else text_problem(row, text_field)


def _no_column(text_field: str, columns: list[str]) -> str:
    """No row has the text field at all: a wrong --text-field, not bad rows."""
    return (f"the data has no {text_field!r} column (columns: {columns}); pass --text-field NAME, "
            "or provide chat rows with 'messages'")


def _handle_bad_rows(where: str, unit: str, numbers: list[int], details: list[str], noun: str,
                     on_bad_rows: str, report: DataReport) -> None:
    """Fail listing the first problems and the fix, or skip them with a warning and count them."""
    shown = ", ".join(map(str, numbers[:MAX_SHOWN])) + (" ..." if len(numbers) > MAX_SHOWN else "")
    summary = f"{where}: {len(numbers)} {noun} ({unit} {shown})"
    listing = "\n".join(f"  {detail}" for detail in details[:MAX_SHOWN])
    if on_bad_rows == "fail":
        raise DataError(f"{summary}; fix them or pass --on-bad-rows skip to skip them:\n{listing}")
    logger.warning("%s skipped:\n%s", summary, listing)
    report.malformed_skipped = len(numbers)


# ---- JSON lines: parsed here, line by line from bytes, so every problem has a line number

def _parse_line(raw: bytes, number: int) -> tuple[dict | None, str | None]:
    """(row, None) or (None, why the line is not a JSON object)."""
    if raw.startswith(codecs.BOM_UTF8):  # editors write one at the start; mid-file, files were concatenated
        if number != 1:
            return None, "starts with a UTF-8 byte order mark (BOM), which only the file's first line may"
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"not a JSON object ({_a(row)})"
    return row, None


def _read_jsonl(path: Path, text_field: str, on_bad_rows: str, report: DataReport) -> datasets.Dataset:
    """JSON lines, checked row by row; keeps only the column training reads."""
    parsed: list[tuple[int, dict]] = []
    problems: list[tuple[int, str]] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            row, problem = _parse_line(raw, number)
            if problem is None:
                parsed.append((number, row))
            else:
                problems.append((number, problem))
    chat = any("messages" in row for _, row in parsed)
    if parsed and not chat and not any(text_field in row for _, row in parsed):
        columns = list(dict.fromkeys(key for _, row in parsed for key in row))
        raise DataError(f"{path}: {_no_column(text_field, columns)}")
    unparsable = len(problems)
    field = "messages" if chat else text_field
    kept: list[dict] = []
    for number, row in parsed:
        problem = _row_problem(row, text_field, chat)
        if problem is None:
            kept.append({field: row[field]})
        else:
            problems.append((number, problem))
    if problems:
        problems.sort()
        noun = "malformed JSON line(s)" if unparsable == len(problems) else "bad row(s)"
        _handle_bad_rows(str(path), "line", [n for n, _ in problems],
                         [f"{path}:{n}: {why}" for n, why in problems[:MAX_SHOWN]], noun, on_bad_rows, report)
    try:
        return datasets.Dataset.from_list(kept)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: the rows' {field!r} values do not share one structure ({exc}); "
                        "give every row the same keys and value types") from exc


# ---- Arrow sources (Parquet/CSV/JSON, save_to_disk, hub): the same checks, column-wise

def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _bad_messages(items: pa.Array) -> np.ndarray:
    """Which flattened chat messages `chat_problem` refuses."""
    kind = items.type
    if not pa.types.is_struct(kind) or kind.get_field_index("role") < 0 or kind.get_field_index("content") < 0:
        return np.ones(len(items), dtype=bool)
    role, content = pc.struct_field(items, "role"), pc.struct_field(items, "content")
    if not (_is_string(role.type) and _is_string(content.type)):
        return np.ones(len(items), dtype=bool)
    ok = pc.and_(pc.is_in(role, value_set=pa.array(ROLES)), pc.is_valid(content))
    return ~pc.fill_null(ok, False).to_numpy(zero_copy_only=False)


def _bad_mask(chunk: pa.Array, chat: bool) -> np.ndarray:
    """Which rows of one Arrow chunk `_row_problem` refuses, without a Python loop over rows."""
    if not chat:
        if not _is_string(chunk.type):
            return np.ones(len(chunk), dtype=bool)
        return chunk.is_null().to_numpy(zero_copy_only=False)
    if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)):
        return np.ones(len(chunk), dtype=bool)
    bad = pc.fill_null(pc.equal(pc.list_value_length(chunk), 0), True).to_numpy(zero_copy_only=False).copy()
    items = pc.list_flatten(chunk)
    if len(items):
        bad[pc.list_parent_indices(chunk).to_numpy()[_bad_messages(items)]] = True
    return bad


def _check_table(rows: datasets.Dataset, where: str, text_field: str, on_bad_rows: str,
                 report: DataReport) -> datasets.Dataset:
    """Check the one column training reads; keep only that column and the good rows."""
    chat = "messages" in rows.column_names
    field = "messages" if chat else text_field
    if field not in rows.column_names:
        raise DataError(f"{where}: {_no_column(text_field, rows.column_names)}")
    kept = rows.select_columns([field])
    chunks = kept.with_format("arrow")[:].column(field).chunks
    mask = np.concatenate([_bad_mask(chunk, chat) for chunk in chunks]) if chunks else np.zeros(0, dtype=bool)
    bad = np.flatnonzero(mask)
    if len(bad):
        kind = kept.data.schema.field(field).type
        details = [f"{where}: row {i + 1}: "
                   f"{_row_problem(rows[int(i)], text_field, chat) or f'{field!r} has the unsupported type {kind}'}"
                   for i in bad[:MAX_SHOWN]]
        _handle_bad_rows(where, "row", (bad + 1).tolist(), details, "bad row(s)", on_bad_rows, report)
        kept = kept.select(np.flatnonzero(~mask))
    return kept


def is_hub_name(source: str) -> bool:
    """`owner/name` that is not a local path: a hub dataset ("data/train.jsonl" is a missing file)."""
    return source.count("/") == 1 and not source.startswith((".", "/")) and \
        Path(source).suffix.lower() not in FILE_FORMATS


def _no_split(where: str, split: str, splits: list[str]) -> DataError:
    return DataError(f"{where}: no split {split!r} (splits: {', '.join(splits)}); "
                     "pass --data-split NAME to choose one")


def _load_folder(path: Path, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path} is a folder but not a dataset saved with save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise _no_split(str(path), split, list(loaded))
        return loaded[split]
    if split != "train":
        raise DataError(f"{path} holds one dataset, not splits; --data-split {split!r} applies only to "
                        "DatasetDict folders and hub datasets: leave it at 'train'")
    return loaded


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing or bad dataset
        try:  # asked only on failure, so a good load costs nothing extra
            splits = datasets.get_dataset_split_names(source)
        except Exception:  # noqa: BLE001 - the original error is the one to report then
            splits = None
        if splits and split not in splits:
            raise _no_split(repr(source), split, list(splits)) from exc
        raise DataError(f"{source!r} is not a local file and could not be loaded from the hub ({exc})") from exc


def load_rows(source: str, on_bad_rows: str = "fail", report: DataReport | None = None, split: str = "train",
              text_field: str = "text") -> datasets.Dataset:
    """Checked rows from a local file (JSONL/JSON/Parquet/CSV), a `save_to_disk` folder, or a hub name.

    Returns one column, `messages` for chat data or `text_field`, holding only usable rows
    (bad ones fail or are skipped per `on_bad_rows`). `split` picks a DatasetDict's split.
    """
    report = report if report is not None else DataReport()
    if on_bad_rows not in BAD_ROW_CHOICES:
        raise DataError(f"on_bad_rows={on_bad_rows!r} is unknown; pass --on-bad-rows {'|'.join(BAD_ROW_CHOICES)}")
    path = Path(source)
    if path.is_dir():
        rows = _check_table(_load_folder(path, split), str(path), text_field, on_bad_rows, report)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise DataError(f"{path}: unknown data format {suffix!r}; use one of {sorted(FILE_FORMATS)}")
        if split != "train":
            raise DataError(f"{path} is a single file, which has no splits; --data-split {split!r} applies only "
                            "to DatasetDict folders and hub datasets: leave it at 'train'")
        if suffix == ".jsonl":
            rows = _read_jsonl(path, text_field, on_bad_rows, report)
        else:
            try:
                loaded = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train")
            except Exception as exc:  # noqa: BLE001 - datasets raises many types for bad files
                raise DataError(f"{path}: could not be read as {FILE_FORMATS[suffix]} ({exc})") from exc
            rows = _check_table(loaded, str(path), text_field, on_bad_rows, report)
    elif is_hub_name(source):
        rows = _check_table(_load_hub(source, split), repr(source), text_field, on_bad_rows, report)
    else:
        raise DataError(f"{source}: no such file or folder")
    if len(rows) == 0:
        skipped = f" after skipping {report.malformed_skipped} bad row(s)" if report.malformed_skipped else ""
        raise DataError(f"{source}: the dataset is empty{skipped}")
    report.rows = len(rows)
    return rows
