"""From HF's batch (b, s) with masks and position ids to TE's packed THD layout.

Our decoder layers always run on packed tokens `(t, hidden)` with `cu_seqlens` marking the
documents: padded batches (left or right) drop their pad tokens, packed rows (several
documents whose `position_ids` restart) split into their documents, plain batches are one
document per row. No FLOP goes to padding and no token attends across documents. The
layout is computed once per model forward and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    """Where the real tokens of a (b, s) batch go in the packed (t, h) tensor."""

    batch: int
    seq: int
    keep: torch.Tensor | None
    """Flat indices (into b*s) of real tokens; None when every position is real."""
    cu_seqlens: torch.Tensor
    """int32 document boundaries in the packed tensor, TE's `cu_seqlens` (includes padding docs)."""
    max_seqlen: int
    num_real: int
    """Real tokens t; the packed tensor may have extra pad rows after them (`pad_rows`)."""
    pad_rows: int = 0

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(self.batch * self.seq, hidden.shape[-1])  # (b*s, h)
        tokens = flat if self.keep is None else flat.index_select(0, self.keep)  # (t, h)
        if self.pad_rows:
            tokens = torch.cat([tokens, tokens.new_zeros(self.pad_rows, tokens.shape[-1])])
        return tokens

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[: self.num_real]
        if self.keep is None:
            return tokens.reshape(self.batch, self.seq, tokens.shape[-1])
        flat = tokens.new_zeros(self.batch * self.seq, tokens.shape[-1])
        flat = flat.index_copy(0, self.keep, tokens)
        return flat.reshape(self.batch, self.seq, tokens.shape[-1])


def real_token_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """(b, s) bool, True for real tokens, from a 2D padding mask or HF's 4D attention mask.

    A 4D mask (b, 1, q, k) from HF's mask builders lets token i see itself exactly when i is
    real, so its diagonal is the padding mask (bool masks: True = may attend; float masks:
    0 = may attend).
    """
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:
        return attention_mask.to(device=device).bool()
    if attention_mask.dim() == 4:
        if attention_mask.shape[-1] != attention_mask.shape[-2]:
            raise ValueError(
                f"attention mask of shape {tuple(attention_mask.shape)}: queries and keys differ in "
                "length (a KV cache); te-llama layers run full sequences only, pass use_cache=False"
            )
        diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (b, s)
        real = diagonal if diagonal.dtype == torch.bool else diagonal == 0
        return real.expand(batch, seq).to(device)
    raise ValueError(f"attention mask must be 2D (b, s) or 4D (b, 1, s, s), got {tuple(attention_mask.shape)}")


def build_layout(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 batch: int, seq: int, device: torch.device, pad_multiple: int = 1) -> TokenLayout:
    """Documents are maximal runs of real tokens whose position ids count up by one."""
    real = real_token_mask(attention_mask, batch, seq, device)  # (b, s)
    starts = real.clone()
    continues = real[:, 1:] & real[:, :-1]
    if position_ids is not None:
        pos = position_ids.to(device).expand(batch, seq)
        continues &= (pos[:, 1:] - pos[:, :-1]) == 1
    starts[:, 1:] &= ~continues
    real_flat, starts_flat = real.reshape(-1), starts.reshape(-1)
    all_real = bool(real_flat.all())
    keep = None if all_real else real_flat.nonzero().squeeze(1)
    packed_starts = starts_flat if keep is None else starts_flat.index_select(0, keep)
    num_real = int(packed_starts.numel())
    boundaries = packed_starts.nonzero().squeeze(1)
    cu = torch.cat([boundaries, torch.tensor([num_real], device=device)]).to(torch.int32)
    pad_rows = -num_real % pad_multiple
    if pad_rows:
        cu = torch.cat([cu, torch.tensor([num_real + pad_rows], device=device, dtype=torch.int32)])
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return TokenLayout(batch, seq, keep, cu, max_seqlen, num_real, pad_rows)


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, batch: int, seq: int,
                           device: torch.device, pad_multiple: int = 1) -> TokenLayout:
    """The layout a caller already knows (HF's `cu_seq_lens_q` / `max_length_q` for packed,
    unpadded rows): no device-to-host synchronization, so the CPU can keep queuing work."""
    cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
    num_real = batch * seq
    pad_rows = -num_real % pad_multiple
    if pad_rows:
        cu = torch.cat([cu, torch.full((1,), num_real + pad_rows, device=device, dtype=torch.int32)])
    return TokenLayout(batch, seq, None, cu, max(int(max_seqlen), pad_rows), num_real, pad_rows)


class LayoutCache:
    """Computes the layout once per model forward: every layer gets the same mask tensors."""

    def __init__(self, pad_multiple: int = 1) -> None:
        self.pad_multiple = pad_multiple
        self._key: tuple | None = None
        self._layout: TokenLayout | None = None

    def get(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
            max_seqlen: int | None = None) -> TokenLayout:
        batch, seq = hidden.shape[:2]
        if cu_seqlens is not None:
            key = (cu_seqlens, max_seqlen, batch, seq, hidden.device)
            if self._key is not None and key[0] is self._key[0] and key[1:] == self._key[1:]:
                return self._layout
            self._layout = layout_from_cu_seqlens(cu_seqlens, max_seqlen or seq, batch, seq, hidden.device,
                                                  self.pad_multiple)
            self._key = key
            return self._layout
        key = (attention_mask, position_ids, batch, seq, hidden.device)
        if self._key is not None and all(a is b or a == b for a, b in zip(key[2:], self._key[2:])) \
                and key[0] is self._key[0] and key[1] is self._key[1]:
            return self._layout
        self._layout = build_layout(attention_mask, position_ids, batch, seq, hidden.device, self.pad_multiple)
        self._key = key
        return self._layout
