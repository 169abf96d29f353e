"""What makes a TE-style layer a drop-in `LlamaDecoderLayer` for transformers 5.

The HF model calls each decoder layer with `(hidden_states (b, s, h), attention_mask,
position_ids, ...)` and expects one tensor back. `HFDecoderAdapter` packs the batch into
THD tokens (once per forward, shared through `ModelContext`), runs the TE-style layer's own
forward, and unpacks. Mixed in first, before `te.TransformerLayer` or the reference layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..rope import RotaryAngles
from ..spec import ArchitectureSpec
from ..token_layout import LayoutCache, TokenLayout

PackedRunner = Callable[[torch.nn.Module, torch.Tensor, TokenLayout], "torch.Tensor | None"]


class ModelContext:
    """State shared by all decoder layers of one model: rotary angles and the token layout."""

    def __init__(self, hf_config: Any, spec: ArchitectureSpec, pad_multiple: int = 1) -> None:
        self.rope = RotaryAngles(hf_config, spec)
        self.layouts = LayoutCache(pad_multiple)
        self.packed_runner: PackedRunner | None = None
        """Set from outside to run a training layer's packed tokens another way (te_llama.train.cuda_graphs
        replays CUDA graphs); it returns the layer's output, or None to run the layer eagerly."""


class HFDecoderAdapter(GradientCheckpointingLayer):
    """HF decoder-layer call signature on top of a THD TransformerLayer forward."""

    context: ModelContext

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Any = None,
                cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                cache: Any = None, **_: Any) -> torch.Tensor:
        """`cu_seq_lens_q` / `max_length_q` (HF's packed-sequence kwargs), when the caller gives
        them, describe the flattened (b*s) tokens directly and spare a device synchronization."""
        cache = past_key_values if past_key_values is not None else cache  # its name in newer transformers
        if cache is not None:  # a cache we would not fill would make generation silently wrong
            raise NotImplementedError(
                "te-llama layers do not keep a KV cache; generate with use_cache=False, or export "
                "with te_llama.save_pretrained and generate with vanilla transformers or vLLM"
            )
        layout = self.context.layouts.get(hidden_states, attention_mask, position_ids, cu_seq_lens_q, max_length_q)
        tokens = layout.pack(hidden_states)  # (t, h)
        runner = self.context.packed_runner
        if runner is not None and self.training and torch.is_grad_enabled():
            out = runner(self, tokens, layout)
            if out is not None:
                return layout.unpack(out)
        angles = self.context.rope.table(max(layout.max_seqlen, 1), hidden_states.device)
        return layout.unpack(self.forward_packed(tokens, layout.cu_seqlens, layout.max_seqlen, angles))  # (b, s, h)

    def forward_packed(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       angles: torch.Tensor) -> torch.Tensor:
        """The TransformerLayer's own forward on packed tokens (t, h): causal within each document."""
        return super().forward(
            tokens,
            self_attn_mask_type="padding_causal",
            rotary_pos_emb=angles,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
        )
