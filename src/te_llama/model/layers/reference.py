"""A pure-PyTorch twin of TE's `TransformerLayer` for Llama-family settings.

Same parameter names and shapes as TE (`self_attention.layernorm_qkv.*`,
`self_attention.q_norm.*`, `self_attention.proj.*`, `layernorm_mlp.*`) and the same math in
TE's packed THD format: RMSNorm (TE's `zero_centered_gamma` for Gemma), fused or separate QKV
(TE's per-group interleaving), per-head q/k RMSNorm before RoPE (TE's `qk_norm_type="RMSNorm"`,
`qk_norm_before_rope=True`), rotary embedding restarting at each document, causal GQA attention
within documents, SwiGLU or tanh-GeGLU (TE's "swiglu" / "geglu"), residuals. It runs the
converted model on CPU, and it is the oracle the TE layer is checked against on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..mapping import renamed, te_layer_shapes
from ..spec import ArchitectureSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm as TE computes it: statistics and scaling in float32, output in the input dtype.
    zero_centered: scale by (1 + weight), the 1 added in float32 (TE's `zero_centered_gamma`)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    gamma = weight.float() + 1.0 if zero_centered else weight.float()
    return (normed * gamma).to(x.dtype)


def gated_activation(fc1_out: torch.Tensor, kind: str) -> torch.Tensor:
    """TE's gated units: the activation on the first half (gate), times the second (up)."""
    gate, up = fc1_out.chunk(2, dim=-1)
    if kind == "swiglu":
        return F.silu(gate) * up
    if kind == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"activation={kind!r} is unknown")


def split_qkv(mixed: torch.Tensor, spec: ArchitectureSpec, interleaved: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A QKV GEMM's output (t, q + 2 kv) -> q (t, nh, d), k and v (t, ng, d).

    interleaved: TE's fused layout (per KV group, its query heads, then its key, then its value);
    else [q | k | v] (TE's separate Q/K/V parameters, one GEMM over their concatenation)."""
    if interleaved:
        mixed = mixed.view(-1, spec.num_kv_heads, spec.heads_per_group + 2, spec.head_dim)
        q, k, v = mixed.split([spec.heads_per_group, 1, 1], dim=2)
    else:
        q, k, v = mixed.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
    return (q.reshape(-1, spec.num_heads, spec.head_dim), k.reshape(-1, spec.num_kv_heads, spec.head_dim),
            v.reshape(-1, spec.num_kv_heads, spec.head_dim))


def qkv_projection(p: nn.Module, x: torch.Tensor, spec: ArchitectureSpec, fuse_qkv: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm + Q/K/V of `p` (a `layernorm_qkv`'s parameters) in one GEMM, as TE runs it:
    (t, q + 2 kv) in TE's layout for `fuse_qkv` (`split_qkv`), and normed (t, h)."""
    normed = rms_norm(x, p.layer_norm_weight, spec.rms_norm_eps, spec.norm_zero_centered)  # (t, h)
    if fuse_qkv:
        return F.linear(normed, p.weight, getattr(p, "bias", None)), normed
    weight = torch.cat([p.query_weight, p.key_weight, p.value_weight])  # TE's separate Q/K/V parameters
    bias = torch.cat([p.query_bias, p.key_bias, p.value_bias]) if hasattr(p, "query_bias") else None
    return F.linear(normed, weight, bias), normed


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       heads_per_group: int) -> torch.Tensor:
    """Causal attention inside each document; q (t, nh, d), k/v (t, ng, d) -> (t, nh * d)."""
    k, v = k.repeat_interleave(heads_per_group, dim=1), v.repeat_interleave(heads_per_group, dim=1)  # (t, nh, d)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            doc = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (nh, s, d)
            out[start:end] = F.scaled_dot_product_attention(*doc, is_causal=True).transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (t, heads, d), angles (t, d) -> x rotated (non-interleaved halves, like HF and TE)."""
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def positions_in_documents(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token within its own document (restarting at 0)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long().repeat_interleave(lengths)
    return torch.arange(total, device=cu_seqlens.device) - starts


def _add_parameters(root: nn.Module, shapes: dict[str, tuple[int, ...]], device, dtype) -> None:
    """Empty parameters at dotted names, in plain submodules, so names nest exactly as TE's modules do."""
    for name, shape in shapes.items():
        *path, param = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(param, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))


class ReferenceTransformerLayer(nn.Module):
    """TE TransformerLayer's parameters and forward (THD, padding_causal) in plain PyTorch."""

    PARAMETER_RENAMES: dict[str, str] = {}
    """TE TransformerLayer names this layer keeps under other names (te_llama.model.mapping.SPLIT_MLP_NAMES)."""

    def __init__(self, spec: ArchitectureSpec, fuse_qkv: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec, self.fuse_qkv = spec, fuse_qkv
        _add_parameters(self, renamed(te_layer_shapes(spec, fuse_qkv), self.PARAMETER_RENAMES), device, dtype)

    def qk_norm_and_rope(self, q: torch.Tensor, k: torch.Tensor, rotary_pos_emb: torch.Tensor,
                         cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q/k RMSNorm (Qwen3; TE's are never zero-centered), then RoPE restarting per document."""
        spec = self.spec
        if spec.qk_norm:
            q = rms_norm(q, self.self_attention.q_norm.weight, spec.rms_norm_eps)
            k = rms_norm(k, self.self_attention.k_norm.weight, spec.rms_norm_eps)
        angles = rotary_pos_emb[positions_in_documents(cu_seqlens, q.shape[0]), 0, 0]  # (t, d)
        return apply_rotary(q, angles), apply_rotary(k, angles)

    def forward(self, hidden_states: torch.Tensor, *, rotary_pos_emb: torch.Tensor,
                cu_seqlens_q: torch.Tensor, **_: object) -> torch.Tensor:
        """hidden_states (t, h) packed tokens; rotary_pos_emb (s_max, 1, 1, d) angles."""
        spec = self.spec
        mixed, _normed = qkv_projection(self.self_attention.layernorm_qkv, hidden_states, spec, self.fuse_qkv)
        q, k, v = split_qkv(mixed, spec, interleaved=self.fuse_qkv)
        q, k = self.qk_norm_and_rope(q, k, rotary_pos_emb, cu_seqlens_q)
        attn = document_attention(q, k, v, cu_seqlens_q, spec.heads_per_group)
        proj = self.self_attention.proj
        hidden = hidden_states + F.linear(attn, proj.weight, getattr(proj, "bias", None))

        mlp = self.layernorm_mlp
        normed = rms_norm(hidden, mlp.layer_norm_weight, spec.rms_norm_eps, spec.norm_zero_centered)
        fc1_out = F.linear(normed, mlp.fc1_weight, getattr(mlp, "fc1_bias", None))  # (t, 2 * ffn)
        return hidden + F.linear(gated_activation(fc1_out, spec.activation), mlp.fc2_weight,
                                 getattr(mlp, "fc2_bias", None))
