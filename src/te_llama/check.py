"""`te-llama check`: convert a model, compare it with HF on the same weights, round-trip it.

The quickest way for a user (or CI) to see that conversion is exact on this machine:
logits and gradients against HF, and save_pretrained -> vanilla HF load bit-identical.
By default one tiny preset per supported family (DEFAULT_PRESETS).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .model.convert import convert
from .model.hf_checkpoint import save_pretrained
from .model.mapping import te_to_hf
from .model.presets import preset_config
from .model.spec import ArchitectureSpec

DEFAULT_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gemma")
"""Llama stands for Mistral too (the same layer); Phi-3's fused HF tensors and Gemma's scaled
embeddings and (1 + w) norms are exercised through save_pretrained and the logits."""


@dataclass
class CheckResult:
    preset: str
    model_type: str
    backend: str
    fuse_qkv: bool
    logits_max_rel_error: float
    grads_max_rel_error: float
    export_bit_identical: bool


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_preset(preset: str, backend: str = "reference", fuse_qkv: bool = False,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, seq_len: int = 64) -> CheckResult:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(preset_config(preset), dtype=dtype).to(device)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = convert(copy.deepcopy(hf), backend=backend, fuse_qkv=fuse_qkv)
    spec = ArchitectureSpec.from_hf_config(hf.config)
    ids = torch.randint(0, hf.config.vocab_size, (2, seq_len), device=device)

    ref, out = hf(ids, labels=ids), ours(ids, labels=ids)
    ref.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    our_grads = te_to_hf({n: p.grad for n, p in ours.named_parameters() if p.grad is not None}, spec, fuse_qkv)
    grad_error = max(_max_rel(our_grads[n], g) for n, g in ref_grads.items())

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, Path(tmp) / "export")
        reloaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "export", dtype=dtype).state_dict()
    identical = set(reloaded) == set(original) and all(
        torch.equal(reloaded[k].cpu(), v.cpu()) for k, v in original.items())
    return CheckResult(preset, spec.model_type, backend, fuse_qkv, _max_rel(out.logits, ref.logits), grad_error,
                       identical)
