"""The Triton AdamW kernel against torch's fused AdamW (FP32 math, BF16 storage), on the GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")]

SHAPES = [(1,), (4097,), (37, 129), (1024, 4096)]  # odd sizes around the kernel's block of 4096
STEPS = 5
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
# The kernels do the same FP32 arithmetic (Triton with approximate division and square root)
# and round to BF16: a last bit or two apart on a few elements, which later steps carry along.
# A wrong formula would be far off everywhere.
ULPS, MOST = 2, 0.999
MAX_ULPS = 8


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_triton_update_matches_torch_fused_adamw(shape: tuple[int, ...]) -> None:
    from te_llama.train.triton_adamw import adamw_update

    gen = torch.Generator(device="cuda").manual_seed(0)
    start = (0.02 * torch.randn(shape, device="cuda", generator=gen)).to(torch.bfloat16)  # weight-sized
    grads = [torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) * 1e-2 for _ in range(STEPS)]
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], fused=True, **HYPER)
    ours = start.clone()
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    for step, grad in enumerate(grads, start=1):
        reference.grad = grad
        optimizer.step()
        adamw_update(ours, grad, m, v, step, HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"])
    state = optimizer.state[reference]
    for name, got, want in (("param", ours, reference.detach()), ("exp_avg", m, state["exp_avg"]),
                            ("exp_avg_sq", v, state["exp_avg_sq"])):
        got, want = got.float(), want.float()
        rms = float(want.pow(2).mean().sqrt())
        diff = (got - want).abs()
        off = diff > ULPS * torch.finfo(torch.bfloat16).eps * want.abs() + 1e-6 * rms
        assert float(off.float().mean()) <= 1 - MOST, f"{name}: {int(off.sum())} of {off.numel()} beyond {ULPS} ulps"
        # A last-bit difference at the tensor's scale, carried into later steps, stays that size
        # when the element itself shrinks towards zero: hence the floor at the scale's ulps.
        eps = torch.finfo(torch.bfloat16).eps
        far = diff > MAX_ULPS * eps * want.abs() + ULPS * eps * rms
        assert not bool(far.any()), (f"{name}: {int(far.sum())} elements beyond {MAX_ULPS} ulps, e.g. got "
                                     f"{got[far][:3].tolist()} want {want[far][:3].tolist()}")
    update_ours, update_ref = (ours.float() - start.float()), (reference.detach().float() - start.float())
    assert float(update_ref.norm()) > 0 and not torch.equal(ours, start)
    assert float((update_ours - update_ref).norm() / update_ref.norm()) <= 1e-2


def test_triton_update_refuses_mismatched_state() -> None:
    from te_llama.train.triton_adamw import adamw_update

    p = torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="exp_avg must be contiguous and shaped"):
        adamw_update(p, torch.zeros_like(p), torch.zeros(64, device="cuda"), torch.zeros_like(p), 1, 1e-3,
                     (0.9, 0.95), 1e-8, 0.0)


def test_finetune_default_uses_the_triton_kernel(tmp_path, caplog, monkeypatch, record_metric) -> None:
    """`te-llama finetune` (clipping on: AdamW after backward) with Triton's kernel, its default on
    CUDA, vs torch's fused AdamW (what it uses where Triton cannot run)."""
    import logging

    import te_llama.train.step as step
    from te_llama.train.config import resolve_config
    from te_llama.train.recipe import finetune

    caplog.set_level(logging.INFO, logger="te_llama")
    losses = {}
    for kernel in ("triton", "torch"):
        if kernel == "torch":
            monkeypatch.setattr(step, "triton_available", lambda device: False)
        config = resolve_config(output_dir=str(tmp_path / kernel), backend="reference", precision="bf16",
                                max_steps=12, eval_fraction=0.0, save_every=0,
                                tensorboard=False, cache_dir=str(tmp_path / "cache"))
        losses[kernel] = finetune(config).final_loss
    gap = abs(losses["triton"] - losses["torch"]) / losses["torch"]
    record_metric(triton_loss=losses["triton"], torch_loss=losses["torch"], relative_gap=gap)
    assert "optimizer: AdamW, triton kernel" in caplog.text and "optimizer: AdamW, torch kernel" in caplog.text
    assert gap <= 1e-2
