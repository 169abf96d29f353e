"""The forward of a decoder layer with LoRA adapters beside its frozen GEMMs, written once.

TE's `TransformerLayer` never exposes o_proj's input (the attention output) nor down_proj's (the
gated activation: `LayerNormMLP` fuses fc1, activation and fc2), and its fused Q/K/V and gate/up
GEMMs have no per-projection outputs. A LoRA layer is therefore composed of the pieces, each
with the parameters the TransformerLayer has: RMSNorm + QKV (one GEMM, fused or over separate
Q/K/V parameters), per-head q/k norms, RoPE, causal attention within documents, o_proj, RMSNorm
+ fc1 (gate and up in one GEMM), the gated unit, fc2. The adapters' matmuls sit beside them in
plain torch: per HF projection (q, k, v, o, gate, up, down; Phi-3's qkv and gate_up), each
reading its projection's own input, their outputs added to that projection's slice of the
fused output. `LoraForward` is that sequence over primitives; the TE layer (`te_lora.py`) and
its pure-PyTorch twin (`lora_reference.py`) implement the primitives.
"""

from __future__ import annotations

import torch

from ..lora import LoraAdapters, plus
from ..spec import ArchitectureSpec


class LoraForward:
    """Mixed in first (before the class that supplies the primitives): subclasses set `spec` and `lora`
    and implement, on packed tokens,

        project_qkv(x) -> q (t, nh, d), k, v (t, ng, d), normed (t, h)     RMSNorm + the Q/K/V GEMM
        qk_norm_and_rope(q, k, rotary_pos_emb, cu_seqlens) -> q, k          Qwen3's norms, then RoPE
        attend(q, k, v, cu_seqlens, max_seqlen) -> (t, nh * d)              causal, within documents
        project_out(attn) -> (t, h)                                         o_proj (TE's proj)
        project_fc1(hidden) -> [gate | up] (t, 2 * ffn), normed (t, h)      RMSNorm + fc1
        gated_unit([gate | up]) -> (t, ffn)                                 act(gate) * up
        project_fc2(act) -> (t, h)                                          down_proj (fc2)
    """

    spec: ArchitectureSpec
    lora: LoraAdapters

    def forward(self, hidden_states: torch.Tensor, *, rotary_pos_emb: torch.Tensor, cu_seqlens_q: torch.Tensor,
                max_seqlen_q: int | None = None, **_: object) -> torch.Tensor:
        """hidden_states (t, h) packed tokens; rotary_pos_emb (s_max, 1, 1, d) angles."""
        q, k, v, normed = self.project_qkv(hidden_states)
        deltas = self.lora.deltas("attention_in", normed)  # (t, q), (t, kv), (t, kv) where targeted
        q = plus(q, _heads(deltas.get("q"), q))
        k, v = plus(k, _heads(deltas.get("k"), k)), plus(v, _heads(deltas.get("v"), v))
        q, k = self.qk_norm_and_rope(q, k, rotary_pos_emb, cu_seqlens_q)
        attn = self.attend(q, k, v, cu_seqlens_q, max_seqlen_q or hidden_states.shape[0])  # (t, nh * d)
        hidden = hidden_states + plus(self.project_out(attn), self.lora.deltas("attention_out", attn).get("o"))

        fc1_out, normed = self.project_fc1(hidden)  # [gate | up] (t, 2 * ffn)
        deltas = self.lora.deltas("mlp_in", normed)
        if deltas:
            gate, up = fc1_out.chunk(2, dim=-1)
            fc1_out = torch.cat([plus(gate, deltas.get("gate")), plus(up, deltas.get("up"))], dim=-1)
        act = self.gated_unit(fc1_out)  # (t, ffn)
        return hidden + plus(self.project_fc2(act), self.lora.deltas("mlp_hidden", act).get("down"))


def _heads(delta: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """(t, heads * d) -> (t, heads, d): HF's head order is TE's (head h in KV group h // heads_per_group)."""
    return None if delta is None else delta.view(like.shape)
