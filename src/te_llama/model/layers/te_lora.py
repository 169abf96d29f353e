"""The TE LoRA decoder layer (GPU): TE's modules for the frozen base, the adapters beside them.

Built from the modules `te.TransformerLayer` is made of, with the same constructor arguments and
parameter names (fc2 apart: `te_llama.model.mapping.SPLIT_MLP_NAMES`): `te.LayerNormLinear` for
RMSNorm + QKV with `return_layernorm_output=True` (the q/k/v adapters' input), `te.RMSNorm` q/k
norms, TE's fused RoPE on THD tokens, `te.DotProductAttention` (THD, padding_causal), `te.Linear`
for o_proj, `te.LayerNormLinear` for RMSNorm + fc1, TE's SwiGLU / GeGLU op, `te.Linear` for fc2.

FP8 base (`base_recipe`): the GEMM modules are built inside `te.quantized_model_init`, so their
weights are TE quantized tensors of that recipe (1 byte per element) and their GEMMs run FP8
without casting the weights each step. Loading copies a checkpoint's values into them, which
quantizes them (`QuantizedTensor.copy_`). The recipe must be the run's FP8 autocast recipe (TE
checks that the weights' type matches it). Hopper's FP8 GEMMs read a weight transposed for the
backward's dgrad; TE keeps that copy on the weight once made, which would double the base's
bytes. Where TE can derive it from the row-wise data (per-tensor scaling; 2D block scaling, the
weights' default) the weights are built row-wise only and `release_weight_transposes` frees what
a backward made; MXFP8 cannot derive it (the column-wise scales differ) and keeps both.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import transformer_engine.pytorch as te
from torch import nn
from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb

from ..lora import LoraAdapters, LoraSpec, freeze_base
from ..mapping import SPLIT_MLP_NAMES
from ..spec import ArchitectureSpec
from .lora_layer import LoraForward
from .te_decoder import FP8Switch, check_te_head_dim

TE_GATED_UNITS = {"swiglu": te.ops.SwiGLU, "geglu_tanh": te.ops.GEGLU}
"""TE's fused gated units (the kernels LayerNormMLP runs): act on the first half of [gate | up]."""


class TELoraLayer(LoraForward, nn.Module):
    """The LoRA layer on TE modules; FP8 GEMMs under an FP8 autocast, the adapters in BF16 beside them."""

    PARAMETER_RENAMES = SPLIT_MLP_NAMES

    def __init__(self, spec: ArchitectureSpec, lora: LoraSpec, layer_index: int, fuse_qkv: bool,
                 device: torch.device | str, dtype: torch.dtype, base_recipe: Any = None) -> None:
        super().__init__()
        check_te_head_dim(spec)
        self.spec, self.fuse_qkv = spec, fuse_qkv
        h, q, kv, ffn = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
        norm = {"eps": spec.rms_norm_eps, "normalization": "RMSNorm", "zero_centered_gamma": spec.norm_zero_centered,
                "return_layernorm_output": True}
        common = {"bias": spec.layer_bias, "params_dtype": dtype, "device": device}
        split = None if fuse_qkv else {"query": q, "key": kv, "value": kv}  # TE's own names for separate Q/K/V
        quantized = te.quantized_model_init(enabled=True, recipe=base_recipe) if base_recipe is not None else \
            contextlib.nullcontext()
        self.transient_transposes = base_recipe is not None and not base_recipe.mxfp8()
        """The FP8 weights hold no column-wise copy but while a backward needs it."""
        self.self_attention = nn.Module()
        # TE quantizes weights row- and column-wise when built with gradients on, row-wise only without
        with quantized, torch.no_grad() if self.transient_transposes else contextlib.nullcontext():
            self.self_attention.layernorm_qkv = te.LayerNormLinear(h, q + 2 * kv, parameters_split=split,
                                                                   **norm, **common)
            self.self_attention.proj = te.Linear(q, h, **common)
            self.layernorm_mlp = te.LayerNormLinear(h, 2 * ffn, parameters_split={"fc1": 2 * ffn}, **norm, **common)
            self.fc2 = te.Linear(ffn, h, **common)
        if spec.qk_norm:  # Qwen3: TE's MultiheadAttention builds these two for qk_norm_type="RMSNorm"
            for name in ("q_norm", "k_norm"):
                self.self_attention.add_module(name, te.RMSNorm(spec.head_dim, eps=spec.rms_norm_eps,
                                                                params_dtype=dtype, device=device))
        self.self_attention.core_attention = te.DotProductAttention(
            spec.num_heads, spec.head_dim, num_gqa_groups=spec.num_kv_heads, attention_dropout=0.0,
            qkv_format="thd", attn_mask_type="padding_causal", layer_number=layer_index + 1)
        self.activation = TE_GATED_UNITS[spec.activation]()
        self.lora = LoraAdapters(spec, lora, device, interleaved_qkv=fuse_qkv)
        freeze_base(self)  # a LoRA layer's base never trains (an FP8 one cannot)

    def gemm_modules(self) -> tuple[nn.Module, ...]:
        return self.self_attention.layernorm_qkv, self.self_attention.proj, self.layernorm_mlp, self.fc2

    def release_weight_transposes(self) -> None:
        """Free the column-wise (transposed) FP8 copies of the frozen weights that a backward made (dgrad
        on Hopper); the next backward makes them again (one transpose per weight and step)."""
        if not self.transient_transposes:
            return
        for module in self.gemm_modules():
            for name in module.weight_names:
                weight = getattr(module, name)
                if isinstance(weight, te.QuantizedTensor):
                    weight.update_usage(rowwise_usage=True, columnwise_usage=False)

    def project_qkv(self, x):
        return self.self_attention.layernorm_qkv(x)  # (t, q + 2 kv), (t, h)

    def qk_norm_and_rope(self, q, k, rotary_pos_emb, cu_seqlens):
        if self.spec.qk_norm:  # before RoPE, as TE's qk_norm_before_rope=True
            q, k = self.self_attention.q_norm(q), self.self_attention.k_norm(k)
        rope = {"tensor_format": "thd", "fused": True, "cu_seqlens": cu_seqlens}
        return apply_rotary_pos_emb(q, rotary_pos_emb, **rope), apply_rotary_pos_emb(k, rotary_pos_emb, **rope)

    def attend(self, q, k, v, cu_seqlens, max_seqlen):
        return self.self_attention.core_attention(
            q, k, v, qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen, attn_mask_type="padding_causal")

    def project_out(self, attn):
        return self.self_attention.proj(attn)

    def project_fc1(self, hidden):
        return self.layernorm_mlp(hidden)

    def gated_unit(self, fc1_out):
        return self.activation(fc1_out)

    def project_fc2(self, act):
        return self.fc2(act)


class TELoraDecoderLayer(FP8Switch, TELoraLayer):
    """`TELoraLayer` called the way transformers calls a `LlamaDecoderLayer`."""
