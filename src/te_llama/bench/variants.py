"""The rows of `te-llama bench`: each is a finetune configuration by name, plus a peer's own speed-up.

A te-llama row is the `FinetuneConfig` a user would run (so the bench times exactly what
`te-llama finetune` runs); a peer row is `--backend hf --no-packing` (transformers as is) with
the peer's transformation applied to the model: torch.compile, Liger Kernel, torchao float8.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

from ..availability import te_import_error
from ..precision import FP8_PRECISIONS

TE = {"backend": "te"}
HF = {"backend": "hf", "packing": False}
LORA = {"lora_rank": 16}
"""The LoRA rows: rank 16 (alpha 32), every decoder linear; --lora-rank / --lora-targets ... override it."""
PEER_LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
"""LoRA options that pass through to the peers too (PEFT has them all; an FP8 base is te-llama's)."""


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    """The finetune options this row runs (FinetuneConfig fields); the rest are finetune's defaults."""
    peer: str | None = None
    """A peer's transformation of the HF model: "compile", "liger" or "torchao-fp8"."""
    needs: tuple[str, ...] = ()
    """"cuda", "te", or Python module names."""

    @property
    def ours(self) -> bool:
        return self.config.get("backend") != "hf"


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("hf", "transformers as is (SDPA attention): te-llama finetune --backend hf --no-packing", HF),
    Variant("hf-compile", "transformers under torch.compile", HF, "compile", ("cuda",)),
    Variant("hf-liger", "transformers with Liger Kernel (fused RMSNorm, RoPE, SwiGLU, linear + cross-entropy)", HF,
            "liger", ("cuda", "liger_kernel")),
    Variant("hf-torchao-fp8", "transformers with torchao float8 training (decoder linears) + torch.compile", HF,
            "torchao-fp8", ("cuda", "torchao")),
    Variant("te-eager", "te-llama's TE layers in BF16, packed, without CUDA graphs, overlap or fused loss "
            "(the tutorial's layer swap)", TE | {"precision": "bf16", "cuda_graphs": False,
                                                 "overlap_optimizer": False, "fused_loss": False},
            None, ("cuda", "te")),
    Variant("te-bf16", "te-llama finetune's defaults in BF16 (--precision bf16): CUDA graphs, fused loss, "
            "AdamW overlapping backward", TE | {"precision": "bf16"}, None, ("cuda", "te")),
    Variant("te-default", "exactly te-llama finetune's defaults (on an FP8 GPU: fp8-delayed-fastacc, CUDA graphs, "
            "fused loss, AdamW overlapping backward, no clipping)", TE, None, ("cuda", "te")),
    Variant("reference", "te-llama's pure-PyTorch reference layers (any device; harness checks)",
            {"backend": "reference"}),
    Variant("te-lora", "te-llama LoRA (rank 16, every decoder linear) on a frozen BF16 base: --lora-rank 16 "
            "--precision bf16, CUDA graphs, fused loss, AdamW overlapping backward", TE | LORA | {"precision": "bf16"},
            None, ("cuda", "te")),
    Variant("te-lora-fp8", "te-llama LoRA on a frozen FP8 base: --lora-rank 16 --lora-base fp8 (FP8 weights and "
            "GEMMs, BF16 adapters)", TE | LORA | {"lora_base": "fp8"}, None, ("cuda", "te")),
    Variant("hf-lora", "transformers + PEFT LoRA (same rank and targets), SDPA: --backend hf --lora-rank 16",
            HF | LORA, None, ("peft",)),
    Variant("hf-liger-lora", "transformers + Liger Kernel + PEFT LoRA (same rank and targets)", HF | LORA, "liger",
            ("cuda", "liger_kernel", "peft")),
]}
DEFAULT_VARIANTS = ("hf", "hf-compile", "hf-liger", "hf-torchao-fp8", "te-eager", "te-bf16", "te-default")
"""The peers, the tutorial's layer swap, te-llama in BF16, and te-llama's default."""


def unavailable_reason(variant: Variant, options: dict[str, Any] | None = None) -> str | None:
    """Why a variant cannot run on this machine, or None."""
    for need in variant.needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU"
        if need == "te" and te_import_error():
            return f"Transformer Engine not importable ({te_import_error()})"
        if need not in ("cuda", "te") and importlib.util.find_spec(need) is None:
            return f"{need} not installed"
    config = variant.config | (options or {} if variant.ours else {})
    precision = config.get("precision")
    if precision in (None, "auto") and config.get("lora_base") == "fp8":
        precision = "fp8-current"  # what an FP8 base needs at least (block scaling where the GPU has it)
    if precision in FP8_PRECISIONS:
        from ..precision import check_precision_available

        try:
            check_precision_available(precision)
        except Exception as exc:  # noqa: BLE001 - the reason is what we report
            return str(exc)
    return None


def select(names: list[str]) -> list[Variant]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; `te-llama bench --list` prints them")
    return [VARIANTS[n] for n in names]


def apply_peer(peer: str | None, model: torch.nn.Module) -> torch.nn.Module:
    """The HF model as the peer trains it."""
    if peer is None:
        return model
    if peer == "compile":
        return torch.compile(model)
    if peer == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
        return model
    from torchao.float8 import convert_to_float8_training

    # torchao's recipe: every decoder linear in float8, the lm_head kept in BF16; then compile.
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: "lm_head" not in fqn)
    return torch.compile(model)
