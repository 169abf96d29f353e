"""What this machine can run, asked once per process: Transformer Engine, Triton, CUDA."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def te_import_error() -> str | None:
    """Why `transformer_engine.pytorch` cannot be imported here, or None when it can."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install raising at import
        return f"{type(exc).__name__}: {exc}"
    return None


def te_available() -> bool:
    return te_import_error() is None


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Whether Triton kernels can run on `device` (cheap: asked every training step)."""
    return device.type == "cuda" and _triton_installed()
