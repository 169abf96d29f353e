"""Where a training step's milliseconds go: torch.profiler over a few steps, kernels by category.

    python3 scripts/profile_step.py --variant te-default te-bf16 hf --preset llama2-7b --batch 8 --seq 256

Each variant is a `te-llama bench` row: the step profiled is the finetune step the bench times.

Categories come from kernel names (GEMM, attention, optimizer, norm, RoPE, FP8 cast/amax,
loss/softmax, other elementwise). "idle" = step wall time minus GPU busy time (launch gaps,
host syncs). With the overlapped optimizer (te-default, te-bf16), kernels of two streams
run at once: busy can exceed the step and "idle" goes negative; each category then counts its
kernels' own durations.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import torch

CATEGORIES = [  # first match wins: attention before GEMMs (cuDNN's attention kernels are named "..._sm90_...")
    ("attention", r"fmha|flash|sdpa|attn|softmax_fwd|scaled_dot"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|cublas|matmul"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_adam"),
    ("norm", r"rmsnorm|layernorm|norm"),
    ("rope", r"rope|rotary"),
    ("fp8 cast/amax", r"cast|amax|quantiz|transpose|fp8|scale"),
    ("loss/logits", r"cross_entropy|log_softmax|nll|logsumexp"),
    ("copy/index", r"copy|index|gather|scatter|cat|fill"),
    ("elementwise", r"elementwise|vectorized|silu|swiglu|mul|add|reduce"),
]


def categorize(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def profile(variant: str, preset: str, batch: int, seq: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from te_llama.bench.measure import BenchSettings, build_step, micro_batches, token_batches
    from te_llama.bench.variants import VARIANTS

    v = VARIANTS[variant]
    settings = BenchSettings(preset=preset, batch=batch, seq=seq)
    train_step, _ = build_step(v, settings)
    rows = token_batches(settings, train_step.raw_model.config.vocab_size, torch.device("cpu"))
    batches = micro_batches(rows[:1], v, train_step.graph_shape.tokens if train_step.graph_shape else None)

    def step():
        loss, _ = train_step(batches)
        float(loss)  # the finetune loop reads the loss every step

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / steps
    by_cat: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if device_us <= 0 or evt.device_type.name != "CUDA" and "cuda" not in str(evt.device_type).lower():
            continue
        ms = device_us / 1000 / steps
        by_cat[categorize(evt.key)] = by_cat.get(categorize(evt.key), 0) + ms
        top.append((evt.key[:90], ms))
    busy = sum(by_cat.values())
    top.sort(key=lambda x: -x[1])
    return {"variant": variant, "step_ms": wall, "busy_ms": busy, "idle_ms": wall - busy,
            "categories": dict(sorted(by_cat.items(), key=lambda x: -x[1])), "top": top[:25]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", nargs="+", default=["te-default", "te-bf16"])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(profile(args.one, args.preset, args.batch, args.seq, args.steps)))
        return
    for variant in args.variant:
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--preset", args.preset, "--batch",
                               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)],
                              check=False, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(variant, "FAILED", proc.stderr[-1500:])
            continue
        r = json.loads(lines[-1])
        print(f"\n== {variant}: step {r['step_ms']:.1f} ms, GPU busy {r['busy_ms']:.1f}, idle {r['idle_ms']:.1f}")
        for cat, ms in r["categories"].items():
            print(f"   {cat:<14} {ms:7.1f} ms")
        for name, ms in r["top"][:20]:
            print(f"   {ms:7.2f}  {name}")


if __name__ == "__main__":
    main()
