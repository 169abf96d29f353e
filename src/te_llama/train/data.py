"""Finetuning examples: tokenize checked rows once, split off eval, fingerprint and cache.

Rows come from `te_llama.train.rows` (reading and checking, with bad rows named by file and
line). Text rows are tokenized with an EOS; chat rows are rendered with the tokenizer's chat
template, loss on assistant tokens only by default. Each example becomes `input_ids` and
`labels` (-100 where no loss), truncated to `max_seq_len`. Tokenized examples are cached under
a key made of content hashes (`data_fingerprint`), so an edited file is never served from a
stale cache and a second run on the same data does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets

from .rows import (
    MAX_SHOWN,
    DataError,
    DataReport,
    chat_problem,
    is_hub_name,
    load_rows,
    text_problem,
)

__all__ = ["IGNORE_INDEX", "MAX_SHOWN", "DataError", "DataReport", "data_fingerprint", "load_examples",
           "load_rows", "split_eval", "tokenize_rows"]

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 20  # files are hashed in 1 MiB reads, never loaded whole


def _text_example(row: dict, tokenizer: Any, text_field: str) -> tuple[list[int], list[int]]:
    problem = text_problem(row, text_field)
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
    problem = chat_problem(row)
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


def split_eval(examples: datasets.Dataset, eval_fraction: float, seed: int
               ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
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
    elif is_hub_name(source):
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
