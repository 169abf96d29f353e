"""The forward of a decoder layer with LoRA adapters beside its frozen GEMMs, written once.

TE's `TransformerLayer` never exposes o_proj's input (the attention output) nor down_proj's (the
gated activation: `LayerNormMLP` fuses fc1, activation and fc2), and its fused Q/K/V and gate/up
GEMMs have no per-projection outputs. A LoRA layer is therefore composed of the pieces, each
with the parameters the TransformerLayer has: RMSNorm + QKV (one GEMM, fused or over separate
Q/K/V parameters), per-head q/k norms, RoPE, causal attention within documents, o_proj, RMSNorm
+ fc1 (gate and up in one GEMM), the gated unit, fc2. The adapters sit beside them in plain
torch: per HF projection (q, k, v, o, gate, up, down; Phi-3's qkv and gate_up), each reading its
projection's own input, accumulated onto that projection's rows of the fused output
(`LoraAdapters.add_to`). `LoraForward` is that sequence over primitives; the TE layer (`te_lora.py`) and
its pure-PyTorch twin (`lora_reference.py`) implement the primitives.
"""

from __future__ import annotations

import torch

from ..lora import LoraAdapters
from ..spec import ArchitectureSpec
from .reference import split_qkv


class LoraForward:
    """Mixed in first (before the class that supplies the primitives): subclasses set `spec`, `lora` and
    `fuse_qkv` and implement, on packed tokens,

        project_qkv(x) -> (t, q + 2 kv), normed (t, h)      RMSNorm + the Q/K/V GEMM (TE's layout: `split_qkv`)
        qk_norm_and_rope(q, k, rotary_pos_emb, cu_seqlens) -> q, k          Qwen3's norms, then RoPE
        attend(q, k, v, cu_seqlens, max_seqlen) -> (t, nh * d)              causal, within documents
        project_out(attn) -> (t, h)                                         o_proj (TE's proj)
        project_fc1(hidden) -> [gate | up] (t, 2 * ffn), normed (t, h)      RMSNorm + fc1
        gated_unit([gate | up]) -> (t, ffn)                                 act(gate) * up
        project_fc2(act) -> (t, h)                                          down_proj (fc2)
    """

    spec: ArchitectureSpec
    lora: LoraAdapters
    fuse_qkv: bool

    def forward(self, hidden_states: torch.Tensor, *, rotary_pos_emb: torch.Tensor, cu_seqlens_q: torch.Tensor,
                max_seqlen_q: int | None = None, **_: object) -> torch.Tensor:
        """hidden_states (t, h) packed tokens; rotary_pos_emb (s_max, 1, 1, d) angles."""
        mixed, normed = self.project_qkv(hidden_states)
        q, k, v = split_qkv(self.lora.add_to("attention_in", mixed, normed), self.spec, interleaved=self.fuse_qkv)
        q, k = self.qk_norm_and_rope(q, k, rotary_pos_emb, cu_seqlens_q)
        attn = self.attend(q, k, v, cu_seqlens_q, max_seqlen_q or hidden_states.shape[0])  # (t, nh * d)
        hidden = hidden_states + self.lora.add_to("attention_out", self.project_out(attn), attn)

        fc1_out, normed = self.project_fc1(hidden)  # [gate | up] (t, 2 * ffn)
        act = self.gated_unit(self.lora.add_to("mlp_in", fc1_out, normed))  # (t, ffn)
        return hidden + self.lora.add_to("mlp_hidden", self.project_fc2(act), act)
