"""Shared fixtures: tiny random HF models built from `hf_configs`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from hf_configs import ARCHITECTURES  # noqa: E402


def random_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An HF *ForCausalLM with random weights; norms and biases randomized too, so none is trivial."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name](), dtype=dtype)
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if param.dim() == 1:  # norm weights (ones) and biases (zeros) by default
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if "norm" in name_ else 0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param
