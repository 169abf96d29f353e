"""The reference layer as an HF decoder layer (CPU runs and CI)."""

from __future__ import annotations

from .hf_adapter import HFDecoderAdapter
from .reference import ReferenceTransformerLayer


class ReferenceDecoderLayer(HFDecoderAdapter, ReferenceTransformerLayer):
    """`ReferenceTransformerLayer` called the way transformers calls a `LlamaDecoderLayer`."""
