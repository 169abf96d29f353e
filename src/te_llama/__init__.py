"""te-llama: finetune HF Llama-family models on NVIDIA Transformer Engine layers.

`import te_llama` needs neither Transformer Engine nor CUDA; the TE backend is imported
only when asked for.
"""

from .errors import (
    BackendUnavailableError,
    CheckpointError,
    TeLlamaError,
    UnsupportedArchitectureError,
    WeightMappingError,
)
from .model.convert import convert
from .model.hf_checkpoint import from_pretrained, save_pretrained
from .model.lora import LoraSpec
from .model.mapping import hf_to_te, te_to_hf
from .model.spec import ArchitectureSpec
from .precision import PRECISIONS, autocast

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
    "LoraSpec",
    "save_pretrained",
    "te_to_hf",
]
