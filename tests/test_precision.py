"""Precision names and their errors on machines that cannot run them (this CPU machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_hf_model, te_unavailable_reason

import te_llama
from te_llama import BackendUnavailableError
from te_llama.precision import AUTO_FP8, PRECISIONS, auto_precision

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")


@needs_no_gpu
@pytest.mark.parametrize("precision", te_llama.PRECISIONS[2:])
def test_fp8_without_gpu_is_a_clear_error(precision: str) -> None:
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        with te_llama.autocast(precision):
            pass


def test_unknown_precision_is_named() -> None:
    with pytest.raises(ValueError, match="precision='fp4'"):
        with te_llama.autocast("fp4"):
            pass


@pytest.mark.skipif(te_unavailable_reason() is None, reason="checks the no-TE error path")
def test_te_backend_without_te_or_gpu_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="backend='te' needs"):
        te_llama.convert(random_hf_model("llama2-mha"), backend="te")


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="backend='jax'"):
        te_llama.convert(random_hf_model("llama2-mha"), backend="jax")


def test_bf16_autocast_runs_the_reference_model_on_cpu() -> None:
    model = te_llama.convert(random_hf_model("llama3.1-gqa-llama3-rope"), backend="reference")
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        with te_llama.autocast("bf16", device_type="cpu"):
            low = model(ids).logits
    assert low.dtype == torch.bfloat16
    assert float((low.float() - full).norm() / full.norm()) < 2e-2


@pytest.mark.parametrize(("available", "want"), [(True, AUTO_FP8), (False, "bf16")])
def test_auto_precision_is_the_qualified_fp8_recipe_on_fp8_gpus_outside_fsdp2(monkeypatch, available, want) -> None:
    import sys
    import types

    probe = types.SimpleNamespace(is_fp8_available=lambda return_reason: (available, "" if available else "sm_80"))
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", probe)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "GPU")
    monkeypatch.setattr(te_llama.precision, "te_import_error", lambda: None)  # the fake TE above imports
    assert auto_precision(cuda=True, backend="te")[0] == want
    assert auto_precision(cuda=True, backend="te", fsdp2=True) == ("bf16", "FSDP2 (FP8 is chosen with --precision)")
    assert auto_precision(cuda=True, backend="hf")[0] == "bf16"
    assert auto_precision(cuda=False, backend="reference") == ("fp32", "no GPU")
    assert AUTO_FP8 in PRECISIONS
    monkeypatch.setattr(te_llama.precision, "te_import_error", lambda: "No module named 'transformer_engine'")
    assert auto_precision(cuda=True, backend="te") == (
        "bf16", "Transformer Engine not importable (No module named 'transformer_engine')")
