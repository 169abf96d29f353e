"""Why FP8 with delayed scaling trails BF16 early in training: per step, the loss, how much of a
decoder layer's weight gradient is exactly zero, how far the layer's weights moved, and the
layer's FP8 scales (TE's `fp8_meta`), for each precision on the same model and batches.

    python3 scripts/diag_fp8_learning.py --layers 4 --steps 8 --precision bf16 fp8-delayed fp8-current

The Llama-2-7B shape with fewer layers, random weights, random tokens (as `te-llama bench`), eager TE layers.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.convert import decoder_layers
from te_llama.presets import preset_config


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
              f"moved {moved:.2e}  {fp8_scales(layer)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp8-delayed", "fp8-current", "fp8"])
    args = parser.parse_args()
    config = preset_config("llama2-7b")
    config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    distinct = [torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).cuda() for _ in range(4)]
    batches = [distinct[i % 4] for i in range(args.steps)]
    for precision in args.precision:
        run(precision, base, batches, args.lr)


if __name__ == "__main__":
    main()
