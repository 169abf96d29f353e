"""Finetuning data: load rows from the user's files, validate them, tokenize once (cached).

Rows are plain text (`text_field`) or chat (`messages`: list of {role, content}, rendered
with the tokenizer's chat template, loss on assistant tokens only by default). Every row is
checked before any tokenizing, so bad data fails at start naming the file and the line (JSONL)
or row, or is skipped and counted with `--on-bad-rows skip`. Each example becomes `input_ids`
and `labels` (-100 where no loss), truncated to `max_seq_len`. Tokenized examples are cached
under a key made of content hashes (`data_fingerprint`), so an edited file is never served
from a stale cache and a second run on the same data does not tokenize again.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import TeLlamaError

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
BAD_ROW_CHOICES = ("fail", "skip")
MAX_SHOWN = 10  # bad rows listed in an error; the count covers the rest
CHUNK_BYTES = 1 << 20  # files are hashed in 1 MiB reads, never loaded whole


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


def _text_problem(row: dict, text_field: str) -> str | None:
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


def _chat_problem(row: dict) -> str | None:
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
    return _chat_problem(row) if chat else _text_problem(row, text_field)


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
    """Which flattened chat messages `_chat_problem` refuses."""
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


def _is_hub_name(source: str) -> bool:
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
    elif _is_hub_name(source):
        rows = _check_table(_load_hub(source, split), repr(source), text_field, on_bad_rows, report)
    else:
        raise DataError(f"{source}: no such file or folder")
    if len(rows) == 0:
        skipped = f" after skipping {report.malformed_skipped} bad row(s)" if report.malformed_skipped else ""
        raise DataError(f"{source}: the dataset is empty{skipped}")
    report.rows = len(rows)
    return rows


def _text_example(row: dict, tokenizer: Any, text_field: str) -> tuple[list[int], list[int]]:
    problem = _text_problem(row, text_field)
    if problem is not None:  # rows from load_rows never get here; direct callers of tokenize_rows may
        raise DataError(f"a row is unusable: {problem}; pass --text-field NAME, or use chat rows with 'messages'")
    ids = tokenizer(row[text_field], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _chat_example(row: dict, tokenizer: Any, assistant_only: bool) -> tuple[list[int], list[int]]:
    """Render with the chat template; label exactly the tokens each assistant turn adds.

    Each assistant turn's tokens are found as the difference between the rendering up to it
    (with the generation prompt) and the rendering including it, which works for any template
    that renders a conversation's prefix as a prefix.
    """
    problem = _chat_problem(row)
    if problem is not None:  # rows from load_rows never get here; direct callers of tokenize_rows may
        raise DataError(f"a chat row is unusable: {problem}")
    messages = row["messages"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat rows need a tokenizer with a chat template; set tokenizer.chat_template "
                        "or use plain text rows with --text-field")
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    if not assistant_only:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        start, end = len(before), len(through)
        if ids[:start] != before or ids[:end] != through:
            raise DataError("the tokenizer's chat template does not render conversations prefix by prefix; "
                            "pass --no-assistant-only-loss to train on all tokens")
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_rows(rows: datasets.Dataset, tokenizer: Any, max_seq_len: int, text_field: str = "text",
                  assistant_only_loss: bool = True, long_rows: str = "truncate",
                  report: DataReport | None = None) -> datasets.Dataset:
    """Tokenize every row once (cached by `datasets`); returns columns input_ids, labels."""
    report = report if report is not None else DataReport()
    is_chat = "messages" in rows.column_names
    if not is_chat and text_field not in rows.column_names:
        raise DataError(f"the data has no {text_field!r} column (columns: {rows.column_names}); "
                        "pass --text-field NAME, or provide chat rows with 'messages'")

    def encode(row: dict) -> dict:
        if is_chat:
            ids, labels = _chat_example(row, tokenizer, assistant_only_loss)
        else:
            ids, labels = _text_example(row, tokenizer, text_field)
        return {"input_ids": ids, "labels": labels, "length": len(ids)}

    encoded = rows.map(encode, remove_columns=rows.column_names, desc="tokenizing")
    lengths = encoded["length"]
    too_long = sum(1 for n in lengths if n > max_seq_len)
    if too_long and long_rows == "fail":
        raise DataError(f"{too_long} example(s) are longer than --max-seq-len {max_seq_len} tokens "
                        f"(longest {max(lengths)}); raise the limit or pass --long-rows truncate|drop")
    if too_long and long_rows == "drop":
        encoded = encoded.filter(lambda row: row["length"] <= max_seq_len, desc="dropping long rows")
        report.dropped_too_long = too_long
    elif too_long:
        encoded = encoded.map(lambda row: {"input_ids": row["input_ids"][:max_seq_len],
                                           "labels": row["labels"][:max_seq_len]}, desc="truncating")
        report.truncated = too_long
    if too_long:
        logger.warning("%d example(s) longer than %d tokens were %s", too_long, max_seq_len,
                       "dropped" if long_rows == "drop" else "truncated")
    has_loss = encoded.map(lambda row: {"n": sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX)},
                           desc="counting targets")
    keep = [i for i, n in enumerate(has_loss["n"]) if n > 0]
    report.dropped_empty = len(encoded) - len(keep)
    if not keep:
        raise DataError("no example has any token to train on (all labels masked or empty rows)")
    if report.dropped_empty:
        encoded = encoded.select(keep)
    report.tokens = sum(len(ids) for ids in encoded["input_ids"])
    return encoded.remove_columns(["length"]) if "length" in encoded.column_names else encoded


def split_eval(examples: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """A held-out eval split (at least one example) when eval_fraction > 0 and there are >= 2 examples."""
    if eval_fraction <= 0 or len(examples) < 2:
        return examples, None
    parts = examples.train_test_split(test_size=max(1, int(round(len(examples) * eval_fraction))), seed=seed)
    return parts["train"], parts["test"]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _is_map_cache(path: Path) -> bool:
    """`datasets` writes `Dataset.map` results into a loaded folder; they are not the user's data."""
    return path.name.startswith("cache-") and path.suffix == ".arrow"


def _tokenizer_sha256(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload = [state, getattr(tokenizer, "chat_template", None), getattr(tokenizer, "special_tokens_map", {}),
               getattr(tokenizer, "all_special_tokens", [])]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(source: str, tokenizer: Any, split: str = "train") -> dict[str, str]:
    """Content hashes of the data and the tokenizer, equal exactly when tokenizing would give the same rows.

    Stored with a run so `--resume` can refuse data or a tokenizer that changed, whatever their
    mtimes say. "data" is the sha256 of a file's bytes; for a folder, of each file's relative path
    and sha256 in path order, plus `split` (`datasets`' own map caches are left out); for a hub
    name, of the name and `split` (the hub content itself is not read).
    """
    path = Path(source)
    if path.is_file():
        data = _file_sha256(path)
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and not _is_map_cache(p))
        listing = "".join(f"{relative}\0{_file_sha256(file)}\n" for relative, file in files)
        data = hashlib.sha256(f"folder\0{split}\n{listing}".encode()).hexdigest()
    elif _is_hub_name(source):
        data = hashlib.sha256(f"hub\0{source}\0{split}".encode()).hexdigest()
    else:
        raise DataError(f"{source}: no such file or folder")
    return {"data": data, "tokenizer": _tokenizer_sha256(tokenizer)}


def _cache_key(fingerprint: dict[str, str], settings: dict) -> str:
    """The tokenized cache's name: the content hashes plus every setting that shapes the examples."""
    return hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:20]


def load_examples(source: str, tokenizer: Any, max_seq_len: int, cache_dir: str | Path | None,
                  text_field: str = "text", assistant_only_loss: bool = True, long_rows: str = "truncate",
                  on_bad_rows: str = "fail", split: str = "train", fingerprint: dict[str, str] | None = None
                  ) -> tuple[datasets.Dataset, DataReport]:
    """Load, check and tokenize `source`, reusing a tokenized copy in `cache_dir` when nothing changed.

    `fingerprint`: `data_fingerprint(source, tokenizer, split)` when the caller has it already
    (hashing a large file twice costs seconds)."""
    settings = {"max_seq_len": max_seq_len, "text_field": text_field, "assistant_only": assistant_only_loss,
                "long_rows": long_rows, "on_bad_rows": on_bad_rows, "split": split}
    cache = None
    if cache_dir:
        fingerprint = fingerprint or data_fingerprint(source, tokenizer, split)
        cache = Path(cache_dir) / f"tokenized-{_cache_key(fingerprint, settings)}"
    if cache is not None and (cache / "report.json").is_file():
        logger.info("using tokenized data cached in %s", cache)
        return datasets.load_from_disk(str(cache / "data")), DataReport(**json.loads((cache / "report.json").read_text()))
    report = DataReport()
    rows = load_rows(source, on_bad_rows, report, split=split, text_field=text_field)
    examples = tokenize_rows(rows, tokenizer, max_seq_len, text_field, assistant_only_loss, long_rows, report)
    if cache is not None:
        examples.save_to_disk(str(cache / "data"))
        (cache / "report.json").write_text(json.dumps(asdict(report)))
        examples = datasets.load_from_disk(str(cache / "data"))
    return examples, report
