"""Decoder layers with TE's parameter layout: the TE one (GPU) and its pure-PyTorch twin."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...availability import te_import_error
from ...errors import BackendUnavailableError
from ..lora import LoraSpec
from ..spec import ArchitectureSpec
from .hf_adapter import HFDecoderAdapter, ModelContext

BACKENDS = ("reference", "te")
# TE FP8 GEMMs need the token count to be a multiple of 16 (MXFP8: 32); the THD layout pads to it.
TOKEN_MULTIPLE = {"reference": 1, "te": 32}


def build_decoder_layer(backend: str, spec: ArchitectureSpec, layer_index: int, fuse_qkv: bool,
                        device: torch.device | str, dtype: torch.dtype, context: ModelContext,
                        lora: LoraSpec | None = None, base_recipe: Any = None) -> HFDecoderAdapter:
    """A new, uninitialized decoder layer for `backend`, on `device` in `dtype`.

    lora: a LoRA layer (the base's GEMMs and the adapters beside them, `lora_layer.py`).
    base_recipe: a TE FP8 recipe: the LoRA layer's frozen GEMM weights are stored in FP8 (backend te).
    """
    if base_recipe is not None and (lora is None or backend != "te"):
        raise ValueError("an FP8 base (base_recipe) is for LoRA layers on backend 'te'")
    if backend == "reference":
        if lora is not None:
            from .lora_reference import ReferenceLoraDecoderLayer

            layer: nn.Module = ReferenceLoraDecoderLayer(spec, lora, fuse_qkv, device=device, dtype=dtype)
        else:
            from .reference_decoder import ReferenceDecoderLayer

            layer = ReferenceDecoderLayer(spec, fuse_qkv, device=device, dtype=dtype)
    elif backend == "te":
        if lora is not None:
            from .te_lora import TELoraDecoderLayer

            layer = TELoraDecoderLayer(spec, lora, layer_index, fuse_qkv, device, dtype, base_recipe)
        else:
            from .te_decoder import build_te_decoder_layer

            layer = build_te_decoder_layer(spec, layer_index, fuse_qkv, device=device, dtype=dtype)
    else:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    layer.context = context
    return layer


def require_te() -> None:
    """Raise a clear error when Transformer Engine cannot be used here."""
    error = te_import_error()
    if error:
        raise BackendUnavailableError(
            f"backend='te' needs NVIDIA Transformer Engine with CUDA ({error}); "
            "install it with `pip install 'te-llama[te]'` on a CUDA machine, or use backend='reference'"
        )
    if not torch.cuda.is_available():
        raise BackendUnavailableError("backend='te' needs a CUDA GPU; none is visible (use backend='reference')")
