"""The fused lm_head + cross-entropy on the GPU: the Triton row pass against the PyTorch one, and
the fused loss of a TE model against transformers' loss under BF16 autocast."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import random_hf_model, te_unavailable_reason

import te_llama
from te_llama.fused_loss import IGNORE_INDEX, _rows_torch, _rows_triton, causal_lm_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")]

VOCABS = [509, 32000, 32003, 128256]   # below, at and around multiples of the kernel's 4096 columns
ROW_LOSS_ATOL = 1e-4                   # FP32 log-sum-exp, other summation order
GRAD_ATOL = 2 ** -9                    # both round the same FP32 gradient to BF16 (max |grad| <= 1)
LOSS_REL = 1e-3                        # fused vs HF loss of a whole model, same BF16 logits
GRAD_REL_L2 = 1e-2                     # parameter gradients, fused vs HF (BF16 GEMMs, scaling placed differently)


@pytest.mark.parametrize("vocab", VOCABS)
def test_triton_row_pass_matches_pytorch(vocab: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (3 * torch.randn(300, vocab, device="cuda", generator=gen)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (300,), device="cuda", generator=gen)
    targets[::7] = IGNORE_INDEX
    targets[1] = vocab - 1  # the last column
    ours, theirs = logits.clone(), logits.clone()
    got, want = _rows_triton(ours, targets), _rows_torch(theirs, targets)
    torch.testing.assert_close(got, want, atol=ROW_LOSS_ATOL, rtol=0)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=GRAD_ATOL, rtol=0)
    assert not ours[::7].any(), "ignored rows must have zero gradient"


@pytest.mark.skipif(te_unavailable_reason() is not None, reason=te_unavailable_reason() or "")
@pytest.mark.parametrize("arch", ["llama3.1-gqa-llama3-rope", "qwen2-qkv-bias-tied"])
def test_fused_loss_of_te_model_matches_hf_loss(arch: str, record_metric) -> None:
    hf = random_hf_model(arch, gpu_size=True, device="cuda", dtype=torch.bfloat16).train()
    model = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=True).train()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, hf.config.vocab_size, (4, 256), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    labels = ids.clone()
    labels[:, :16] = IGNORE_INDEX
    with te_llama.autocast("bf16"):
        want = twin(input_ids=ids, labels=labels).loss
        got = causal_lm_loss(model, labels, input_ids=ids)
    want.backward()
    got.backward()
    loss_gap = abs(float(got.detach()) - float(want.detach())) / float(want.detach())
    theirs = dict(twin.named_parameters())
    grad_gaps = {n: float((p.grad.float() - theirs[n].grad.float()).norm() / theirs[n].grad.float().norm())
                 for n, p in model.named_parameters() if p.grad is not None}
    record_metric(arch=arch, loss_rel=loss_gap, max_grad_rel_l2=max(grad_gaps.values()))
    assert loss_gap <= LOSS_REL
    assert max(grad_gaps.values()) <= GRAD_REL_L2, grad_gaps
