"""te-llama: finetune HF Llama-family models on NVIDIA Transformer Engine layers.

`import te_llama` needs neither Transformer Engine nor CUDA; the TE backend is imported
only when asked for.
"""

from .checkpoint import from_pretrained, save_pretrained
from .convert import convert
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    TeLlamaError,
    UnsupportedArchitectureError,
    WeightMappingError,
)
from .mapping import hf_to_te, te_to_hf
from .precision import PRECISIONS, autocast, keep_layers_in_bf16
from .spec import ArchitectureSpec

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "PRECISIONS",
    "autocast",
    "BackendUnavailableError",
    "CheckpointError",
    "TeLlamaError",
    "UnsupportedArchitectureError",
    "WeightMappingError",
    "convert",
    "from_pretrained",
    "hf_to_te",
    "keep_layers_in_bf16",
    "save_pretrained",
    "te_to_hf",
]
