"""Diagnostic: TE DotProductAttention fwd+bwd vs float32 PyTorch SDPA, per head_dim and layout.

    python scripts/diag_attention_head_dim.py            # THD (packed) and BSHD, GQA, causal
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformer_engine.pytorch as te


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference(q, k, v, bounds, heads, groups):
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        kk = k32[s:e].repeat_interleave(heads // groups, 1).transpose(0, 1)
        vv = v32[s:e].repeat_interleave(heads // groups, 1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(q32[s:e].transpose(0, 1), kk, vv, is_causal=True).transpose(0, 1))
    return (q32, k32, v32), torch.cat(outs).reshape(q.shape[0], -1)


def check(layout: str, d: int, heads: int = 8, groups: int = 2) -> str:
    torch.manual_seed(0)
    bounds = [0, 61, 191, 200] if layout == "thd" else [0, 128, 256]
    t = bounds[-1]
    q = torch.randn(t, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if layout == "thd":
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        attn = te.DotProductAttention(heads, d, num_gqa_groups=groups, attention_dropout=0.0,
                                      qkv_format="thd", attn_mask_type="padding_causal")
        out = attn(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=130, max_seqlen_kv=130)
    else:
        attn = te.DotProductAttention(heads, d, num_gqa_groups=groups, attention_dropout=0.0,
                                      qkv_format="bshd", attn_mask_type="causal")
        out = attn(*(x.view(2, 128, *x.shape[1:]) for x in (q, k, v))).reshape(t, -1)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves, ref = reference(q, k, v, bounds, heads, groups)
    want = torch.autograd.grad(ref, leaves, grad.float())
    return f"{layout:<5} {d:>8} {rel(out, ref):>9.2e} " + " ".join(f"{rel(g, w):>9.2e}" for g, w in zip(got, want))


def main() -> None:
    print(f"{'fmt':<5} {'head_dim':>8} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for layout in ("thd", "bshd"):
        for d in (64, 96, 128, 160, 192, 256):
            print(check(layout, d), flush=True)


if __name__ == "__main__":
    main()
