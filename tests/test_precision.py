"""Precision names and their errors on machines that cannot run them (this CPU machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_hf_model, te_unavailable_reason

import te_llama
from te_llama import BackendUnavailableError

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


def test_keep_layers_in_bf16_marks_the_first_and_last_layers_and_rejects_bad_counts() -> None:
    model = te_llama.convert(random_hf_model("llama2-mha"), backend="reference")
    layers = model.model.layers
    count = len(layers)
    assert te_llama.keep_layers_in_bf16(model, 1, 1) == [0, count - 1]
    assert [layer.fp8 for layer in layers] == [False] + [True] * (count - 2) + [False]
    assert te_llama.keep_layers_in_bf16(model, 0) == []  # back to FP8 everywhere
    assert all(layer.fp8 for layer in layers)
    for first, last in ((count, 1), (-1, 0)):
        with pytest.raises(ValueError, match="choose counts >= 0"):
            te_llama.keep_layers_in_bf16(model, first, last)
