"""Batches for training: packed documents (TE's THD path, no padding) or padded rows.

Packing puts several examples in one row with `position_ids` restarting at each example;
the TE-layout layers turn that into `cu_seqlens`, so no token attends across examples and
no FLOP goes to padding. The first token of every example gets label -100, so no position
is trained to predict the next example's first token: the loss equals the padded batch's.
Padding mode (right padding to a multiple of 16, like NVIDIA's tutorial) is kept for comparison.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX

PAD_MULTIPLE = 16


@dataclass
class Batch:
    """Model inputs plus the token counts that throughput is reported in."""

    inputs: dict[str, torch.Tensor | int | bool]
    real_tokens: int
    """Tokens that are not padding (what useful tokens/s counts)."""
    padded_tokens: int
    """Positions the model computes on, padding included."""


def collate_packed(examples: Sequence[dict], with_cu_seqlens: bool = False, pad_to: int | None = None,
                   pad_token_id: int = 0, max_doc_len: int | None = None) -> Batch:
    """One row (1, T): the examples back to back, position ids restarting per example (and no KV cache, so
    transformers' own attention keeps the examples apart too).

    with_cu_seqlens adds HF's packed-sequence kwargs (`cu_seq_lens_q/k`, `max_length_q/k`),
    computed here on the host, so te-llama layers need no device synchronization per step.
    pad_to fills the row up to T = pad_to with padding documents (pad tokens, no loss) of at
    most max_doc_len tokens: a fixed shape, which CUDA graphs need.
    """
    ids, labels, positions, bounds = [], [], [], [0]

    def add(doc_ids: Sequence[int], doc_labels: Sequence[int]) -> None:
        ids.extend(doc_ids)
        labels.extend([IGNORE_INDEX, *doc_labels[1:]])  # never predict across examples
        positions.extend(range(len(doc_ids)))
        bounds.append(bounds[-1] + len(doc_ids))

    for example in examples:
        add(example["input_ids"], example["labels"])
    real = len(ids)
    if pad_to is not None:
        if real > pad_to:
            raise ValueError(f"{real} tokens do not fit in a row of pad_to={pad_to}")
        chunk = max_doc_len or pad_to
        while len(ids) < pad_to:
            n = min(chunk, pad_to - len(ids))
            add([pad_token_id] * n, [IGNORE_INDEX] * n)
    inputs = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
              "position_ids": torch.tensor([positions]), "use_cache": False}
    if with_cu_seqlens:
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        inputs |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return Batch(inputs, real_tokens=real, padded_tokens=len(ids))


def max_docs_per_batch(plans: Iterable[list[list[int]]], lengths: Sequence[int], budget: int,
                       max_doc_len: int) -> int:
    """Most documents a padded packed row can hold over these epoch plans: examples plus padding documents."""
    most = 1
    for plan in plans:
        for indices in plan:
            gap = budget - sum(lengths[i] for i in indices)
            most = max(most, len(indices) + -(-gap // max_doc_len))
    return most


def collate_padded(examples: Sequence[dict], pad_token_id: int, multiple: int = PAD_MULTIPLE) -> Batch:
    """(b, L) rows right-padded to the longest example rounded up to `multiple`."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    real = int(mask.sum())
    inputs = {"input_ids": ids, "labels": labels}
    if real < ids.numel():  # without padding, no mask: transformers then takes its plain causal attention path
        inputs["attention_mask"] = mask
    return Batch(inputs, real, ids.numel())


def plan_epoch(lengths: Sequence[int], packing: bool, batch_size: int, max_seq_len: int,
               seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every batch of one epoch, shuffled reproducibly by (seed, epoch).

    Packing fills each batch up to `batch_size * max_seq_len` tokens (the padded batch's
    budget); padding takes `batch_size` examples per batch.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if not packing:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    budget = batch_size * max_seq_len
    batches, current, used = [], [], 0
    for index in order:
        if current and used + lengths[index] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        batches.append(current)
    return batches
