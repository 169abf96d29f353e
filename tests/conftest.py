"""Shared fixtures: tiny random HF models built from `hf_configs`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from hf_configs import ARCHITECTURES, GPU_ARCHITECTURES  # noqa: E402


def random_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, gpu_size: bool = False,
                    device: str = "cpu"):
    """An HF *ForCausalLM with random weights; norms and biases randomized too, so none is trivial."""
    torch.manual_seed(seed)
    config = (GPU_ARCHITECTURES if gpu_size else ARCHITECTURES)[name]()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if param.dim() == 1:  # norm weights (ones) and biases (zeros) by default
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if "norm" in name_ else 0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


def te_unavailable_reason() -> str | None:
    """Why the TE backend cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means no TE here
        return f"Transformer Engine not importable: {exc}"
    return None


_METRICS: list[dict] = []


@pytest.fixture
def record_metric(request):
    """Collect numbers a GPU test measured; written to $TE_LLAMA_METRICS (JSON lines) if set."""

    def record(**values) -> None:
        _METRICS.append({"test": request.node.name, **values})

    return record


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("TE_LLAMA_METRICS")
    if path and _METRICS:
        with open(path, "a") as handle:
            for row in _METRICS:
                handle.write(json.dumps(row) + "\n")
