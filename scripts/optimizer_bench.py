"""AdamW step time on a 7B model's parameter shapes: torch's fused AdamW, TE's FusedAdam, our Triton kernel.

    python3 scripts/optimizer_bench.py --preset llama2-7b

Both keep BF16 parameters and BF16 moments (what `te-llama bench` trains with), so both move
the same bytes: read p, g, m, v and write p, m, v (14 B per parameter). Reported against that
traffic at the GPU's measured copy bandwidth. Parameters and gradients are random, never zeros.
"""

from __future__ import annotations

import argparse
import json

import torch

from te_llama.model.presets import preset_config


def parameter_shapes(preset: str) -> list[tuple[int, ...]]:
    c = preset_config(preset)
    h, head_dim = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    layer = [(h,), (qkv, h), (h, c.num_attention_heads * head_dim), (h,), (2 * c.intermediate_size, h),
             (h, c.intermediate_size)]
    return [(c.vocab_size, h)] + layer * c.num_hidden_layers + [(h,), (c.vocab_size, h)]


def copy_bandwidth(numel: int = 2**30) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    a, b = torch.rand(numel, device="cuda", dtype=torch.bfloat16), torch.empty(numel, device="cuda",
                                                                                 dtype=torch.bfloat16)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 2 * numel / (start.elapsed_time(end) / 1000) / 1e9


class TritonAdamW:
    """te_llama.train.triton_adamw's kernel over every tensor, as LayerwiseAdamW(kernel="triton") runs it."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.steps = params, 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    def step(self) -> None:
        from te_llama.train.triton_adamw import adamw_update

        self.steps += 1
        for p, (m, v) in zip(self.params, self.moments):
            adamw_update(p, p.grad, m, v, self.steps, 1e-5, (0.9, 0.999), 1e-8, 1e-2)


def time_optimizer(name: str, shapes: list[tuple[int, ...]], steps: int = 10) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 1e-3
    if name == "torch-fused":
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    elif name == "triton":
        opt = TritonAdamW(params)
    else:
        from transformer_engine.pytorch.optimizers import FusedAdam

        opt = FusedAdam(params, lr=1e-5, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del opt, params
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama2-7b")
    args = parser.parse_args()
    shapes = parameter_shapes(args.preset)
    numel = sum(torch.Size(s).numel() for s in shapes)
    bandwidth = copy_bandwidth()
    floor_ms = 14 * numel / (bandwidth * 1e9) * 1000
    rows = {name: time_optimizer(name, shapes) for name in ("torch-fused", "te-fused-adam", "triton")}
    print(json.dumps({"params": numel, "copy_GBps": round(bandwidth), "traffic_floor_ms": round(floor_ms, 1),
                      "median_ms": {k: round(v, 1) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
