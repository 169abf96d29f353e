"""The Transformer Engine decoder layer (GPU). Imported only when backend='te' is asked for."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import transformer_engine.pytorch as te
from torch import nn

from ...errors import UnsupportedArchitectureError
from ..spec import ArchitectureSpec
from .hf_adapter import HFDecoderAdapter

# cuDNN fused attention in TE 2.20 gives wrong THD (packed) gradients above this head size on
# Hopper (measured: docs/DESIGN.md); forward is fine.
MAX_TE_HEAD_DIM = 128
# The spec's gated unit -> TE's `activation`. TE's "geglu" is GELU with the tanh approximation
# (common/util/math.h: gelu = x * (0.5 + 0.5 * tanh(x * (0.79788456 + 0.03567741 * x^2)))) on the
# first half, times the second: HF's gelu_pytorch_tanh(gate) * up. "qgeglu" is x * sigmoid(1.702 x).
TE_ACTIVATIONS = {"swiglu": "swiglu", "geglu_tanh": "geglu"}


class FP8Switch(HFDecoderAdapter):
    """A TE decoder layer that can run in BF16 inside an FP8 autocast."""


class TEDecoderLayer(FP8Switch, te.TransformerLayer):
    """`te.TransformerLayer` called the way transformers calls a `LlamaDecoderLayer`."""


def check_te_head_dim(spec: ArchitectureSpec) -> None:
    if spec.head_dim > MAX_TE_HEAD_DIM:
        raise UnsupportedArchitectureError(
            f"head_dim={spec.head_dim} > {MAX_TE_HEAD_DIM} is not supported by backend='te': TE's fused "
            "attention computes wrong gradients for packed sequences at that size; use backend='reference'"
        )


def build_te_decoder_layer(spec: ArchitectureSpec, layer_index: int, fuse_qkv: bool,
                           device: torch.device | str, dtype: torch.dtype) -> TEDecoderLayer:
    """Everything from the spec, through TE's constructor arguments; no patching."""
    check_te_head_dim(spec)
    return TEDecoderLayer(
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        num_gqa_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        layernorm_epsilon=spec.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layer_number=layer_index + 1,
        self_attn_mask_type="padding_causal",
        fuse_qkv_params=fuse_qkv,
        qkv_weight_interleaved=True,
        bias=spec.layer_bias,
        activation=TE_ACTIVATIONS[spec.activation],
        normalization="RMSNorm",
        zero_centered_gamma=spec.norm_zero_centered,  # Gemma: x * (1 + w), the 1 added in float32
        qk_norm_type="RMSNorm" if spec.qk_norm else None,  # Qwen3: per head, weight of size kv_channels
        qk_norm_eps=spec.rms_norm_eps,
        qk_norm_before_rope=True,
        attn_input_format="thd",
        params_dtype=dtype,
        device=device,
    )


def recompute_with_te_checkpoint(layers: Iterable[nn.Module]) -> None:
    """Have transformers' activation checkpointing of these TE layers go through TE's checkpoint: it
    recomputes inside the forward's FP8 autocast, with its recipe and scales. (torch's recomputes outside
    it, so the recomputed layer saves BF16 tensors where the forward saved FP8 ones: CheckpointError.)"""
    recompute = functools.partial(te.checkpoint, use_reentrant=False)
    for layer in layers:
        layer._gradient_checkpointing_func = recompute
