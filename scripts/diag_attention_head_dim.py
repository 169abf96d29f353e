"""Diagnostic: TE DotProductAttention (THD, padding_causal, GQA) fwd+bwd vs PyTorch SDPA per head_dim.

    NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python scripts/diag_attention_head_dim.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformer_engine.pytorch as te


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    torch.manual_seed(0)
    lengths = [61, 130, 9]
    cu = torch.tensor([0, 61, 191, 200], dtype=torch.int32, device="cuda")
    t, heads, groups = sum(lengths), 8, 2
    print(f"{'head_dim':>8} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for d in (64, 128, 160, 192, 256):
        q = torch.randn(t, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(t, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(t, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        attn = te.DotProductAttention(heads, d, num_gqa_groups=groups, attention_dropout=0.0,
                                      qkv_format="thd", attn_mask_type="padding_causal")
        out = attn(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=130, max_seqlen_kv=130)
        grad = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            kk = k32[s:e].repeat_interleave(heads // groups, 1).transpose(0, 1)
            vv = v32[s:e].repeat_interleave(heads // groups, 1).transpose(0, 1)
            outs.append(F.scaled_dot_product_attention(q32[s:e].transpose(0, 1), kk, vv, is_causal=True).transpose(0, 1))
        ref = torch.cat(outs).reshape(t, -1)
        rq, rk, rv = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
        print(f"{d:>8} {rel(out, ref):>9.2e} {rel(dq, rq):>9.2e} {rel(dk, rk):>9.2e} {rel(dv, rv):>9.2e}")


if __name__ == "__main__":
    main()
