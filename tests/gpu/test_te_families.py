"""Qwen3, Phi-3 and Gemma on Transformer Engine: TE built with each family's options, FP8 forward and
training, on the GPU.

BF16 against HF per family (TE's error against FP32 within HF BF16's own, x HF_BF16_SLACK) is
`test_te_bf16_matches_hf_and_reference` in test_te_backend.py, over GPU_ARCHITECTURES (one config per
family); CUDA-graph capture per family is in test_te_cuda_graphs.py's CASES.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_hf_model, te_unavailable_reason

import te_llama
from te_llama.model.mapping import te_layer_shapes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(te_unavailable_reason() is not None,
                                                  reason=te_unavailable_reason() or "")]

DEVICE = "cuda"
FAMILIES = ["qwen3-gqa-head-dim", "phi3-mha", "gemma-mqa"]
# FP8 logits vs BF16 logits at random init: as FP8_FORWARD_REL_L2 in test_te_backend.py (E4M3's 3 mantissa
# bits, ~5% per GEMM on random-like sums, 8 GEMMs in these 2-layer models).
FP8_FORWARD_REL_L2 = 0.2
FP8_FIRST_LOSS_REL = 0.01   # FP8's first loss (same weights, FP8 GEMMs) within 1% of BF16's
TRAIN_STEPS = 20


def fp8_unavailable_reason() -> str | None:
    if te_unavailable_reason() is not None:
        return te_unavailable_reason()
    import transformer_engine.pytorch as te

    available, reason = te.is_fp8_available(return_reason=True)
    return None if available else f"no FP8 on this GPU: {reason}"


needs_fp8 = pytest.mark.skipif(fp8_unavailable_reason() is not None, reason=fp8_unavailable_reason() or "")


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def te_model(arch: str, fuse_qkv: bool = True, dtype: torch.dtype = torch.bfloat16):
    return te_llama.convert(random_hf_model(arch, gpu_size=True, device=DEVICE, dtype=dtype),
                            backend="te", fuse_qkv=fuse_qkv)


def token_batch(vocab: int, batch: int = 4, seq: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_te_layer_has_the_family_options_and_the_mapped_parameters(arch: str, fuse_qkv: bool) -> None:
    """The TE constructor arguments took effect: parameters exactly as the weight map lays them out
    (Qwen3's self_attention.q_norm/k_norm of head_dim), q/k norm before RoPE, (1 + w) norms, tanh-GeGLU."""
    import transformer_engine.pytorch as te

    model = te_model(arch, fuse_qkv)
    spec = te_llama.ArchitectureSpec.from_hf_config(model.config)
    for layer in model.model.layers:
        assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == te_layer_shapes(spec, fuse_qkv)
        attention, mlp = layer.self_attention, layer.layernorm_mlp
        assert mlp.activation == {"swiglu": "swiglu", "geglu_tanh": "geglu"}[spec.activation]
        assert mlp.zero_centered_gamma == attention.layernorm_qkv.zero_centered_gamma == spec.norm_zero_centered
        assert (attention.q_norm is not None) == (attention.k_norm is not None) == spec.qk_norm
        if spec.qk_norm:
            assert attention.qk_norm_before_rope
            assert isinstance(attention.q_norm, te.RMSNorm) and attention.q_norm.eps == spec.rms_norm_eps
            assert not attention.q_norm.zero_centered_gamma


@needs_fp8
@pytest.mark.parametrize("arch", FAMILIES)
def test_fp8_forward_close_to_bf16(arch: str, record_metric) -> None:
    model = te_model(arch).eval()
    ids = token_batch(model.config.vocab_size, batch=2, seq=200)
    with torch.no_grad(), te_llama.autocast("bf16"):
        bf16 = model(ids).logits
    with torch.no_grad(), te_llama.autocast("fp8"):
        fp8 = model(ids).logits
    error = rel_l2(fp8, bf16)
    record_metric(arch=arch, fp8_vs_bf16_rel_l2=error)
    assert torch.isfinite(fp8).all() and error <= FP8_FORWARD_REL_L2


def _train(model, precision: str, ids: torch.Tensor) -> tuple[list[float], dict[str, torch.Tensor]]:
    """AdamW steps on one fixed batch; the losses, and every parameter's first gradient."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, first_grads = [], {}
    for _ in range(TRAIN_STEPS):
        with te_llama.autocast(precision):
            loss = model(ids, labels=ids).loss
        loss.backward()
        if not first_grads:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, first_grads


@needs_fp8
@pytest.mark.parametrize("arch", FAMILIES)
def test_fp8_training_steps_track_bf16(arch: str, record_metric) -> None:
    """FP32 master weights, FP8 GEMMs: every trainable parameter (q/k norms included) gets a finite,
    nonzero gradient, the first loss is BF16's within FP8_FIRST_LOSS_REL, and both memorize the batch.
    (Random tokens check that training works, not its quality: the final losses near zero are not compared.)"""
    fp8_model = te_model(arch, dtype=torch.float32).train()
    bf16_model = copy.deepcopy(fp8_model)
    ids = token_batch(fp8_model.config.vocab_size, seed=5)
    losses, grads = _train(fp8_model, "fp8", ids)
    bf16_losses, _ = _train(bf16_model, "bf16", ids)
    gap = abs(losses[0] - bf16_losses[0]) / bf16_losses[0]
    record_metric(arch=arch, fp8_losses=losses, bf16_losses=bf16_losses, relative_gap=gap)
    trainable = {n for n, p in fp8_model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable
    assert all(torch.isfinite(g).all() and bool(g.abs().max() > 0) for g in grads.values())
    assert gap <= FP8_FIRST_LOSS_REL
    assert losses[-1] < 0.5 * losses[0] and bf16_losses[-1] < 0.5 * bf16_losses[0]


def test_gemma_head_dim_256_is_refused_on_te() -> None:
    """Gemma-2b / 7b's head_dim 256: TE's packed attention gradients are wrong above 128 (docs/DESIGN.md)."""
    from transformers import AutoModelForCausalLM

    from te_llama.model.presets import preset_config

    config = preset_config("tiny-gemma")
    config.head_dim = 256
    with pytest.raises(te_llama.UnsupportedArchitectureError, match="head_dim=256"):
        te_llama.convert(AutoModelForCausalLM.from_config(config), backend="te")
