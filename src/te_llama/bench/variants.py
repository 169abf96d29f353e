"""The models compared by `te-llama bench`: what each variant is, and whether it can run here.

Each variant turns the same HF model (same preset, same random weights by seed) into what a
user would train: transformers as is, under torch.compile, with Liger Kernel, with torchao
float8 + compile, or converted by te-llama (TE in BF16 / FP8 recipes, or the CPU reference).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..precision import FP8_PRECISIONS


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    needs: tuple[str, ...]
    """Requirements: "cuda", "te", "fp8", or Python module names."""
    precision: str = "bf16"
    """What te_llama.autocast runs the step under ("fp32" for the CPU reference)."""
    cuda_graphs: bool = False
    """Capture the TE layers as CUDA graphs before timing (te-llama finetune's default with packing)."""
    overlap_optimizer: bool = False
    """Train with LayerwiseAdamW: each layer's update starts in backward, on a second stream."""
    overlap_stream_priority: int = 0
    """That stream's priority (-1: high)."""
    optimizer_kernel: str = "torch"
    """LayerwiseAdamW's update kernel: "torch" (fused AdamW) or "triton" (te_llama.train.triton_adamw)."""
    cast_fp8_weights_in_optimizer: bool = False
    """FP8 graphs: LayerwiseAdamW casts each layer's FP8 weights after its update, not the forward."""
    bf16_first_layers: int = 0
    """FP8: this many first decoder layers run in BF16 (`te_llama.keep_layers_in_bf16`)."""
    fused_loss: bool = False
    """The loss through `te_llama.train.loss` (lm_head + cross-entropy without FP32 logits), not HF's."""


def _te_variant(precision: str) -> Variant:
    return Variant(f"te-{precision}", f"te-llama TE layers, {precision}", ("cuda", "te", "fp8"), precision)


def _te_graphs_variants(precision: str) -> list[Variant]:
    """TE layers as CUDA graphs, with AdamW after backward and with LayerwiseAdamW overlapping it."""
    label = "FP8 (block scaling)" if precision == "fp8" else precision
    needs = ("cuda", "te") if precision == "bf16" else ("cuda", "te", "fp8")
    return [Variant(f"te-{precision}-graphs", f"te-llama TE layers as CUDA graphs, {label}", needs, precision,
                    cuda_graphs=True),
            Variant(f"te-{precision}-graphs-triton", f"te-llama TE layers as CUDA graphs, {label}, AdamW after "
                    "backward with the Triton kernel (finetune's default with clipping)", (*needs, "triton"),
                    precision, cuda_graphs=True, optimizer_kernel="triton"),
            Variant(f"te-{precision}-graphs-overlap", f"te-llama TE layers as CUDA graphs, {label}, "
                    "AdamW per layer overlapping backward", needs, precision, cuda_graphs=True,
                    overlap_optimizer=True),
            Variant(f"te-{precision}-graphs-overlap-hp", f"te-llama TE layers as CUDA graphs, {label}, "
                    "AdamW per layer overlapping backward on a high-priority stream", needs, precision,
                    cuda_graphs=True, overlap_optimizer=True, overlap_stream_priority=-1),
            Variant(f"te-{precision}-graphs-overlap-triton", f"te-llama TE layers as CUDA graphs, {label}, "
                    "AdamW per layer (Triton kernel) overlapping backward", (*needs, "triton"), precision,
                    cuda_graphs=True, overlap_optimizer=True, optimizer_kernel="triton"),
            *([Variant(f"te-{precision}-graphs-overlap-triton-cached", f"te-llama TE layers as CUDA graphs, {label}, "
                       "AdamW per layer (Triton kernel) overlapping backward, FP8 weights cast right after each "
                       "layer's update instead of in the forward", (*needs, "triton"), precision, cuda_graphs=True,
                       overlap_optimizer=True, optimizer_kernel="triton", cast_fp8_weights_in_optimizer=True)]
              if precision != "bf16" else []),
            *[Variant(f"te-{precision}-graphs-overlap-triton-bf16first{n}", f"te-llama TE layers as CUDA graphs, "
                      f"{label}, AdamW per layer (Triton kernel) overlapping backward, the first {n} decoder "
                      f"layer{'s' if n > 1 else ''} in BF16", (*needs, "triton"), precision, cuda_graphs=True,
                      overlap_optimizer=True, optimizer_kernel="triton", bf16_first_layers=n)
              for n in ((1, 2, 4, 6, 8) if precision != "bf16" else ())],
            Variant(f"te-{precision}-graphs-overlap-triton-fusedce", f"te-llama TE layers as CUDA graphs, {label}, "
                    "AdamW per layer (Triton kernel) overlapping backward, lm_head + cross-entropy fused "
                    "(te_llama.train.loss)", (*needs, "triton"), precision, cuda_graphs=True, overlap_optimizer=True,
                    optimizer_kernel="triton", fused_loss=True)]


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("hf", "transformers as is (SDPA attention), BF16", ("cuda",)),
    Variant("hf-compile", "transformers under torch.compile, BF16", ("cuda",)),
    Variant("hf-liger", "transformers with Liger Kernel (fused RMSNorm/RoPE/SwiGLU/linear-CE), BF16",
            ("cuda", "liger_kernel")),
    Variant("hf-torchao-fp8", "transformers with torchao float8 training + torch.compile",
            ("cuda", "torchao")),
    Variant("te-bf16", "te-llama TE layers, BF16", ("cuda", "te")),
    *[_te_variant(p) for p in FP8_PRECISIONS],
    *[v for p in ("bf16", *FP8_PRECISIONS) for v in _te_graphs_variants(p)],
    Variant("reference", "te-llama reference layers (pure PyTorch), float32 on CPU", (), "fp32"),
    Variant("reference-fusedce", "te-llama reference layers, float32 on CPU, loss through te_llama.train.loss",
            (), "fp32", fused_loss=True),
    Variant("hf-cpu", "transformers as is, float32 on CPU (harness checks)", (), "fp32"),
]}
DEFAULT_VARIANTS = ("hf", "hf-compile", "hf-liger", "hf-torchao-fp8", "te-bf16", "te-fp8",
                    "te-bf16-graphs-overlap-triton", "te-fp8-graphs-overlap-triton",
                    "te-fp8-graphs-overlap-triton-bf16first6", "te-fp8-delayed-fastacc-graphs-overlap-triton-fusedce")
"""The peers, te-llama eager, the finetune default (BF16 graphs), FP8 that tracks BF16 within 5%
(block scaling, first 6 layers BF16) and the fastest configuration (docs/BENCHMARKS.md)."""


def unavailable_reason(variant: Variant) -> str | None:
    """Why a variant cannot run on this machine, or None."""
    for need in variant.needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU"
        if need == "te" and importlib.util.find_spec("transformer_engine") is None:
            return "Transformer Engine not installed"
        if need == "fp8" and variant.precision in FP8_PRECISIONS:
            try:
                from ..precision import check_precision_available

                check_precision_available(variant.precision)
            except Exception as exc:  # noqa: BLE001 - the reason is what we report
                return str(exc)
        if need not in ("cuda", "te", "fp8") and importlib.util.find_spec(need) is None:
            return f"{need} not installed"
    return None


def select(names: list[str]) -> list[Variant]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    return [VARIANTS[n] for n in names]


def _apply_liger(model):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    return model


def _apply_torchao_fp8(model):
    from torchao.float8 import convert_to_float8_training

    # torchao's recipe: every decoder linear in float8, the lm_head kept in BF16; then compile.
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: "lm_head" not in fqn)
    return torch.compile(model)


def prepare(variant: Variant, model) -> torch.nn.Module:
    """The HF model as this variant trains it."""
    from ..model.convert import convert

    prepare_fn: dict[str, Callable] = {
        "hf": lambda m: m, "hf-cpu": lambda m: m, "hf-compile": torch.compile,
        "hf-liger": _apply_liger, "hf-torchao-fp8": _apply_torchao_fp8,
        "reference": lambda m: convert(m, backend="reference", fuse_qkv=True),
        "reference-fusedce": lambda m: convert(m, backend="reference", fuse_qkv=True),
    }
    if variant.name.startswith("te-"):
        model = convert(model, backend="te", fuse_qkv=True)
        if variant.bf16_first_layers:
            from ..precision import keep_layers_in_bf16

            keep_layers_in_bf16(model, variant.bf16_first_layers)
        return model
    return prepare_fn[variant.name](model)
