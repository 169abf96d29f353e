"""The LoRA layer's pure-PyTorch twin (CPU runs, CI, and the oracle of the TE LoRA layer on the GPU).

Its parameters are the TE LoRA layer's: TE's TransformerLayer names with fc2 in its own module
(`te_llama.model.mapping.SPLIT_MLP_NAMES`), plus the adapters (`lora.<target>.lora_A.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lora import LoraAdapters, LoraSpec, freeze_base
from ..mapping import SPLIT_MLP_NAMES
from ..spec import ArchitectureSpec
from .hf_adapter import HFDecoderAdapter
from .lora_layer import LoraForward
from .reference import ReferenceTransformerLayer, document_attention, gated_activation, qkv_projection, rms_norm


class ReferenceLoraLayer(LoraForward, ReferenceTransformerLayer):
    """`LoraForward` over the reference layer's math (FP32 on the CPU: the parity tests against PEFT)."""

    PARAMETER_RENAMES = SPLIT_MLP_NAMES

    def __init__(self, spec: ArchitectureSpec, lora: LoraSpec, fuse_qkv: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(spec, fuse_qkv, device=device, dtype=dtype)
        self.lora = LoraAdapters(spec, lora, device, interleaved_qkv=fuse_qkv)
        freeze_base(self)  # a LoRA layer's base never trains (an FP8 one cannot)

    def project_qkv(self, x):
        return qkv_projection(self.self_attention.layernorm_qkv, x, self.spec, self.fuse_qkv)

    def attend(self, q, k, v, cu_seqlens, max_seqlen):
        return document_attention(q, k, v, cu_seqlens, self.spec.heads_per_group)

    def project_out(self, attn):
        proj = self.self_attention.proj
        return F.linear(attn, proj.weight, getattr(proj, "bias", None))

    def project_fc1(self, hidden):
        mlp, spec = self.layernorm_mlp, self.spec
        normed = rms_norm(hidden, mlp.layer_norm_weight, spec.rms_norm_eps, spec.norm_zero_centered)
        return F.linear(normed, mlp.fc1_weight, getattr(mlp, "fc1_bias", None)), normed

    def gated_unit(self, fc1_out):
        return gated_activation(fc1_out, self.spec.activation)

    def project_fc2(self, act):
        return F.linear(act, self.fc2.weight, getattr(self.fc2, "bias", None))


class ReferenceLoraDecoderLayer(HFDecoderAdapter, ReferenceLoraLayer):
    """`ReferenceLoraLayer` called the way transformers calls a `LlamaDecoderLayer`."""
