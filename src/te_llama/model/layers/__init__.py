"""Decoder layers with TE's parameter layout: the TE one (GPU) and its pure-PyTorch twin."""

from __future__ import annotations

import torch
from torch import nn

from ...availability import te_import_error
from ...errors import BackendUnavailableError
from ..spec import ArchitectureSpec
from .hf_adapter import HFDecoderAdapter, ModelContext

BACKENDS = ("reference", "te")
# TE FP8 GEMMs need the token count to be a multiple of 16 (MXFP8: 32); the THD layout pads to it.
TOKEN_MULTIPLE = {"reference": 1, "te": 32}


def build_decoder_layer(backend: str, spec: ArchitectureSpec, layer_index: int, fuse_qkv: bool,
                        device: torch.device | str, dtype: torch.dtype, context: ModelContext) -> HFDecoderAdapter:
    """A new, uninitialized decoder layer for `backend`, on `device` in `dtype`."""
    if backend == "reference":
        from .reference_decoder import ReferenceDecoderLayer

        layer: nn.Module = ReferenceDecoderLayer(spec, fuse_qkv, device=device, dtype=dtype)
    elif backend == "te":
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
