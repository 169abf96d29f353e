"""Why FP8 trails BF16 early in training: per step, the loss, how much of a decoder layer's
weight gradient is exactly zero, how far the layer's weights moved, how much of that movement an
FP8 copy of the weight shows (the forward GEMM only sees the FP8 copy), and the layer's FP8 scales
(TE's `fp8_meta`), for each precision on the same model and batches.

    python3 scripts/diag_fp8_learning.py --layers 4 --steps 8 --precision bf16 fp8-delayed fp8-current

The Llama-2-7B shape with fewer layers, random weights, eager TE layers; random tokens (as
`te-llama bench`) or the bundled sample text (`--data sample`, as `te-llama bench --data sample`).
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.bench.measure import BenchSettings, token_batches
from te_llama.model.convert import decoder_layers
from te_llama.model.presets import preset_config


def fp8_scales(layer: torch.nn.Module) -> str:
    """The first forward and backward scale of the layer's QKV GEMM module (delayed scaling keeps them)."""
    module = layer.self_attention.layernorm_qkv
    meta = getattr(module, "fp8_meta", {})
    parts = []
    for key in ("scaling_fwd", "scaling_bwd"):
        state = meta.get(key)
        if state is not None and hasattr(state, "scale"):
            parts.append(f"{key} scale {state.scale.flatten()[:3].tolist()} amax "
                         f"{state.amax_history[0].flatten()[:3].tolist()}")
    return "; ".join(parts) or "-"


def e4m3(weight: torch.Tensor, amax: float) -> torch.Tensor:
    """The weight as a per-tensor-scaled E4M3 copy sees it (current scaling's cast, in torch)."""
    scale = 448.0 / amax
    return (weight.float() * scale).to(torch.float8_e4m3fn).float() / scale


def fp8_visible_movement(start: torch.Tensor, weight: torch.Tensor) -> str:
    """Of the elements the optimizer changed, the share whose E4M3 copy changed too, and the
    movement's norm as the E4M3 copy shows it over the BF16 movement's norm."""
    amax = float(weight.float().abs().max())
    changed = weight != start
    moved_fp8 = e4m3(weight, amax) - e4m3(start, amax)
    visible = float((moved_fp8 != 0)[changed].float().mean()) if bool(changed.any()) else float("nan")
    ratio = float(moved_fp8.norm() / (weight.float() - start.float()).norm().clamp_min(1e-30))
    return f"changed {float(changed.float().mean()):6.1%} of which FP8-visible {visible:6.1%}, norm ratio {ratio:5.2f}"


def run(precision: str, base: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> None:
    model = te_llama.convert(copy.deepcopy(base), backend="te", fuse_qkv=True).train()
    layer = decoder_layers(model)[1]
    weight = layer.layernorm_mlp.fc1_weight
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    start = weight.detach().clone()
    for step, ids in enumerate(batches):
        with te_llama.autocast(precision):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = weight.grad
        zero = float((grad == 0).float().mean()) if grad is not None else float("nan")
        gnorm = float(grad.float().norm()) if grad is not None else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved = float((weight.detach().float() - start.float()).norm() / start.float().norm())
        print(f"{precision:12s} step {step:2d} loss {float(loss):7.4f}  fc1 grad zero {zero:6.1%} norm {gnorm:.3e}  "
              f"moved {moved:.2e}  {fp8_visible_movement(start, weight.detach())}  {fp8_scales(layer)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp8-delayed", "fp8-current", "fp8"])
    parser.add_argument("--data", choices=["random", "sample"], default="random")
    args = parser.parse_args()
    config = preset_config("llama2-7b")
    config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    settings = BenchSettings(batch=args.batch, seq=args.seq, data=args.data)
    distinct = token_batches(settings, config.vocab_size, torch.device("cuda"))
    batches = [distinct[i % len(distinct)] for i in range(args.steps)]
    for precision in args.precision:
        run(precision, base, batches, args.lr)


if __name__ == "__main__":
    main()
