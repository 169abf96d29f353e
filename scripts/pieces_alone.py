"""What each piece of a training step costs alone, through PyTorch's own kernels, on this GPU.

    python3 scripts/pieces_alone.py --preset llama2-7b --batch 8 --seq 256

Why: to ask whether the step's pieces run slower inside the step than alone (SM sharing with
the overlapped AdamW, clocks, cache). Timed alone, with nothing beside them:

- every GEMM of the decoder layers (forward, dgrad, wgrad) as cuBLAS FP8 with per-tensor scales
  and fast accumulation (`torch._scaled_mm`), E4M3 activations and weights, E5M2 gradients,
  the step's shapes;
- the lm_head's three GEMMs in BF16;
- causal attention forward + backward (PyTorch SDPA, whichever backend it picks);
- the memory-bound floors at this GPU's measured copy bandwidth: AdamW (BF16 weights,
  gradients and both moments: 14 bytes per parameter) and the weights' FP8 casts (read 2 bytes,
  write a copy and its transpose: 4 bytes per layer parameter).

Not a floor for the GEMMs or attention: on the H100 (2026-11-25, docs/bench/session7/) these
GEMMs took 79 ms through `torch._scaled_mm` alone but 55 ms through TE inside the step, and
SDPA's attention 11.8 ms against cuDNN's ~5 ms in the step; the profile
(scripts/profile_step.py) is the reference for those. The copy bandwidth and the two
memory-bound floors are what this script is for.

Operands are seeded random values (never zeros). Each piece is timed with CUDA events over
repeats after a warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from optimizer_bench import copy_bandwidth

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def random_fp8(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(rows, cols, device="cuda") * 0.5).to(dtype)


def fp8_gemm_ms(m: int, n: int, k: int, a_dtype: torch.dtype, b_dtype: torch.dtype) -> float:
    """[m, k] @ [k, n] in FP8 -> BF16, A row-major and B column-major (Hopper's only FP8 layout)."""
    a = random_fp8(m, k, a_dtype)
    b = random_fp8(n, k, b_dtype).t()
    one = torch.ones((), device="cuda")

    def gemm() -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

    try:
        gemm()
    except RuntimeError:  # a build without mixed E5M2 x E4M3: time E4M3 x E4M3 (same arithmetic rate)
        print(f"  note: {a_dtype} x {b_dtype} refused by torch._scaled_mm; timing E4M3 x E4M3 for [{m}, {k}] x [{k}, {n}]")
        a = a.float().to(E4M3)
    return median_ms(gemm)


def bf16_gemm_ms(m: int, n: int, k: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    return median_ms(lambda: a @ b)


def linear_gemms_ms(tokens: int, in_features: int, out_features: int) -> dict[str, float]:
    """The three GEMMs of one FP8 linear layer: y = x W^T, dx = dy W, dW = dy^T x."""
    return {"fprop": fp8_gemm_ms(tokens, out_features, in_features, E4M3, E4M3),
            "dgrad": fp8_gemm_ms(tokens, in_features, out_features, E5M2, E4M3),
            "wgrad": fp8_gemm_ms(out_features, in_features, tokens, E5M2, E4M3)}


def attention_ms(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> float:
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        out.backward(grad)

    return median_ms(step)


def pieces_alone(preset: str, batch: int, seq: int) -> dict:
    from te_llama.model.presets import preset_config

    config = preset_config(preset)
    tokens = batch * seq
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers, vocab = config.num_hidden_layers, config.vocab_size
    linears = {"qkv": (hidden, (heads + 2 * kv_heads) * head_dim), "proj": (heads * head_dim, hidden),
               "fc1": (hidden, 2 * inter), "fc2": (inter, hidden)}
    per_layer = {name: linear_gemms_ms(tokens, k, n) for name, (k, n) in linears.items()}
    layer_params = sum(k * n for k, n in linears.values()) + 2 * hidden
    all_params = layers * layer_params + 2 * vocab * hidden + hidden
    bandwidth = copy_bandwidth()  # GB/s, read + write (scripts/optimizer_bench.py)
    pieces = {
        "decoder GEMMs, FP8 (x layers)": layers * sum(sum(g.values()) for g in per_layer.values()),
        "lm_head GEMMs, BF16": bf16_gemm_ms(tokens, vocab, hidden) + bf16_gemm_ms(tokens, hidden, vocab)
        + bf16_gemm_ms(vocab, hidden, tokens),
        "attention fwd+bwd (x layers)": layers * attention_ms(batch, seq, heads, kv_heads, head_dim),
        "AdamW at copy bandwidth (14 B/param)": 14 * all_params / bandwidth / 1e6,
        "FP8 weight casts at copy bandwidth (4 B/param)": 4 * layers * layer_params / bandwidth / 1e6,
    }
    return {"preset": preset, "batch": batch, "seq": seq, "copy_bandwidth_gbs": bandwidth,
            "per_layer_gemm_ms": per_layer, "pieces_ms": pieces, "sum_ms": sum(pieces.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pieces_alone.py times GPU kernels: run it on a CUDA machine")
    torch.manual_seed(0)
    result = pieces_alone(args.preset, args.batch, args.seq)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{args.preset}, {args.batch} x {args.seq} tokens; copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s")
    for name, gemms in result["per_layer_gemm_ms"].items():
        print(f"  {name:<5} " + "  ".join(f"{kind} {ms:.3f}" for kind, ms in gemms.items()) + " ms (one layer)")
    for name, ms in result["pieces_ms"].items():
        print(f"  {name:<48} {ms:7.1f} ms")
    print(f"  {'sum (each alone, nothing else of the step)':<48} {result['sum_ms']:7.1f} ms")


if __name__ == "__main__":
    main()
