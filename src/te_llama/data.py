"""Finetuning data: load rows from the user's files, validate them, tokenize once (cached).

Rows are plain text (`text_field`) or chat (`messages`: list of {role, content}, rendered
with the tokenizer's chat template, loss on assistant tokens only by default). Each
example becomes `input_ids` and `labels` (-100 where no loss), truncated to `max_seq_len`.
Tokenization goes through `datasets.Dataset.map`, which shows progress and caches results
next to the data files, so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets

from .errors import TeLlamaError

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def _read_jsonl(path: Path, on_bad_rows: str, report: DataReport) -> datasets.Dataset:
    """JSON lines, parsed here so malformed lines can be counted and skipped (or fail loudly)."""
    rows: list[dict] = []
    bad: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                rows.append(row)
            except ValueError:
                bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        if on_bad_rows == "fail":
            raise DataError(f"{path}: {len(bad)} malformed JSON line(s) (line {shown}); fix them or pass "
                            "--on-bad-rows skip to skip them")
        logger.warning("%s: skipped %d malformed JSON line(s) (line %s)", path, len(bad), shown)
        report.malformed_skipped = len(bad)
    return datasets.Dataset.from_list(rows)


def load_rows(source: str, on_bad_rows: str = "fail", report: DataReport | None = None) -> datasets.Dataset:
    """Rows from a local file (JSONL/JSON/Parquet/CSV), a `save_to_disk` folder, or a hub name."""
    report = report if report is not None else DataReport()
    path = Path(source)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"{path} is a folder but not a dataset saved with save_to_disk ({exc})") from exc
        rows = loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise DataError(f"{path}: unknown data format {suffix!r}; use one of {sorted(FILE_FORMATS)}")
        if suffix == ".jsonl":
            rows = _read_jsonl(path, on_bad_rows, report)
        else:
            try:
                rows = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train")
            except Exception as exc:  # noqa: BLE001 - datasets raises many types for bad files
                raise DataError(f"{path}: could not be read as {FILE_FORMATS[suffix]} ({exc})") from exc
    elif source.count("/") == 1 and not source.startswith((".", "/")) and path.suffix.lower() not in FILE_FORMATS:
        try:
            rows = datasets.load_dataset(source, split="train")
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{source!r} is not a local file and could not be loaded from the hub ({exc})") from exc
    else:
        raise DataError(f"{source}: no such file or folder")
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset is empty")
    report.rows = len(rows)
    return rows


def _text_example(row: dict, tokenizer: Any, text_field: str) -> tuple[list[int], list[int]]:
    text = row.get(text_field)
    if not isinstance(text, str):
        raise DataError(f"a row has no string field {text_field!r} (fields: {sorted(row)}); "
                        "pass --text-field NAME, or use chat rows with 'messages'")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
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
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataError("a chat row's 'messages' must be a list of {'role': ..., 'content': ...}")
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


def _fingerprint(source: str, tokenizer: Any, settings: dict) -> str:
    """Changes whenever the data file, the tokenizer or a tokenization setting changes."""
    path = Path(source)
    stat = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()] \
        if path.is_dir() else ([(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)]
                               if path.exists() else [source])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_state = backend.to_str() if backend is not None else repr(tokenizer)
    payload = json.dumps([stat, tokenizer_state, getattr(tokenizer, "chat_template", None), settings],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_examples(source: str, tokenizer: Any, max_seq_len: int, cache_dir: str | Path | None,
                  text_field: str = "text", assistant_only_loss: bool = True, long_rows: str = "truncate",
                  on_bad_rows: str = "fail") -> tuple[datasets.Dataset, DataReport]:
    """Load and tokenize `source`, reusing a tokenized copy in `cache_dir` when nothing changed."""
    settings = {"max_seq_len": max_seq_len, "text_field": text_field, "assistant_only": assistant_only_loss,
                "long_rows": long_rows, "on_bad_rows": on_bad_rows}
    cache = Path(cache_dir) / f"tokenized-{_fingerprint(source, tokenizer, settings)}" if cache_dir else None
    if cache is not None and (cache / "report.json").is_file():
        logger.info("using tokenized data cached in %s", cache)
        return datasets.load_from_disk(str(cache / "data")), DataReport(**json.loads((cache / "report.json").read_text()))
    report = DataReport()
    rows = load_rows(source, on_bad_rows, report)
    examples = tokenize_rows(rows, tokenizer, max_seq_len, text_field, assistant_only_loss, long_rows, report)
    if cache is not None:
        examples.save_to_disk(str(cache / "data"))
        (cache / "report.json").write_text(json.dumps(asdict(report)))
        examples = datasets.load_from_disk(str(cache / "data"))
    return examples, report
