"""Shared fixtures: tiny random HF models built from `hf_configs`."""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
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


def float64_oracle(model):
    """A float64 copy of an HF model that rounds nowhere to float32.

    `.double()` alone is not enough: HF's RMSNorm and rotary embedding compute in float32 whatever
    the model's dtype. On this copy only, they compute in float64 (the rotary inverse frequencies
    stay HF's float32 values: they are constants of the model, shared by every implementation).
    Compute its loss with `next_token_loss`: HF's loss upcasts logits "to float", i.e. float32.
    """
    oracle = copy.deepcopy(model).double()
    for module in oracle.modules():
        if type(module).__name__ == "GemmaRMSNorm":
            module.forward = types.MethodType(_gemma_rms_norm_float64, module)
        elif type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    rotary = oracle.model.rotary_emb
    rotary.forward = types.MethodType(_rotary_float64(rotary.forward), rotary)
    return oracle


def _rms_norm_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _gemma_rms_norm_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return (1.0 + self.weight) * (hidden_states * torch.rsqrt(variance + self.eps))


def _rotary_float64(hf_forward):
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hf_forward(x, position_ids)  # HF's own inv_freq update (dynamic rope); its float32 cos/sin are dropped
        freqs = position_ids[..., None].double() * self.inv_freq.double()  # (b, s, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    return forward


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss for these `labels` (mean cross-entropy of the shifted tokens, -100 ignored),
    computed in the logits' dtype."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


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


def padding_mask(side: str, pads: list[int], seq: int) -> torch.Tensor:
    """An attention mask with `pads[row]` pad positions on the `side` of each row."""
    mask = torch.ones(len(pads), seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        if pad:
            mask[row, slice(0, pad) if side == "left" else slice(seq - pad, seq)] = 0
    return mask
