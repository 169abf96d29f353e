"""The fused lm_head + cross-entropy against HF's own loss and gradients (CPU, PyTorch row pass)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import float64_oracle, next_token_loss, random_hf_model
from tolerances import assert_as_accurate_as

import te_llama
from te_llama.train.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    linear_cross_entropy,
    loss_and_grad_rows,
)

FP32_LOSS_ATOL = 1e-5       # same FP32 math, other summation order
# Gradients: no less accurate against a float64 oracle than 8x transformers' own float32 error,
# plus 8 ulps of the tensor's scale (tests/tolerances.py says why not relative to a tensor's max).
GRAD_ERROR_MULTIPLE, GRAD_FLOOR_ULPS = 8.0, 8.0
BF16_LOSS_REL = 1e-2        # under BF16 autocast: both round the logits to BF16, then differ in the order
BF16_GRAD_REL_L2 = 3e-2


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels as a padded, prompt-masked batch has them: some -100, rest the tokens."""
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX   # a masked prompt
    labels[1, -4:] = IGNORE_INDEX  # right padding
    return labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", [None, "reference"])
def test_causal_lm_loss_matches_hf_loss_and_gradients(arch: str, backend: str | None) -> None:
    hf = random_hf_model(arch).train()
    model = copy.deepcopy(hf) if backend is None else te_llama.convert(copy.deepcopy(hf), backend=backend)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = _labels(ids)
    want = twin(input_ids=ids, labels=labels).loss
    want.backward()
    got = causal_lm_loss(model, labels, input_ids=ids)
    got.backward()
    torch.testing.assert_close(got, want, atol=FP32_LOSS_ATOL, rtol=0)
    oracle = float64_oracle(hf)
    next_token_loss(oracle(input_ids=ids).logits, labels).backward()
    want_grads, got_grads, oracle_grads = _grads(twin), _grads(model), _grads(oracle)
    if backend is not None:  # TE-layout names -> HF names, like the oracle's
        spec = te_llama.ArchitectureSpec.from_hf_config(hf.config)
        want_grads, got_grads = (te_llama.te_to_hf(g, spec, False) for g in (want_grads, got_grads))
    assert got_grads.keys() == want_grads.keys() == oracle_grads.keys()
    for name, oracle_grad in oracle_grads.items():
        assert_as_accurate_as(got_grads[name], want_grads[name], oracle_grad, error_multiple=GRAD_ERROR_MULTIPLE,
                              floor_ulps=GRAD_FLOOR_ULPS, name=name)


def test_bf16_autocast_computes_in_bf16_and_stays_close_to_hf() -> None:
    hf = random_hf_model("llama3.1-gqa-llama3-rope").train()
    twin = copy.deepcopy(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = twin(input_ids=ids, labels=ids).loss
        got = causal_lm_loss(hf, ids, input_ids=ids)
    want.backward()
    got.backward()
    assert abs(float(got.detach()) - float(want.detach())) <= BF16_LOSS_REL * float(want.detach())
    for name, want_grad in _grads(twin).items():
        got_grad = dict(hf.named_parameters())[name].grad
        assert got_grad.dtype == want_grad.dtype == torch.float32  # the parameters' dtype, as autograd gives
        assert float((got_grad - want_grad).norm() / want_grad.norm()) <= BF16_GRAD_REL_L2, name


def test_incoming_gradient_scales_both_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(11, 8, generator=generator, requires_grad=True)
    targets = torch.tensor([1, 4, IGNORE_INDEX, 10, 0, 3])
    linear_cross_entropy(hidden, weight, targets).backward()
    once = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3.0 * linear_cross_entropy(hidden, weight, targets)).backward()
    torch.testing.assert_close(hidden.grad, 3 * once[0])
    torch.testing.assert_close(weight.grad, 3 * once[1])
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), reference)


def test_row_pass_overwrites_logits_with_their_gradient_and_zeroes_ignored_rows() -> None:
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([2, IGNORE_INDEX, 8, 0])
    expected = torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets.clamp_min(0), 9)
    expected[1] = 0
    losses = loss_and_grad_rows(logits, targets)
    assert losses[1] == 0
    torch.testing.assert_close(logits, expected)


def test_mis_shaped_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"got \(6, 8\), \(11, 7\), \(6,\)"):
        linear_cross_entropy(torch.zeros(6, 8), torch.zeros(11, 7), torch.zeros(6, dtype=torch.long))


def test_chunks_give_the_one_chunk_loss_and_gradients(monkeypatch) -> None:
    """Logits in chunks of 64 tokens (4 chunks here) against one chunk holding every token."""
    from te_llama.train import loss as loss_module

    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(200, 32, generator=gen), torch.randn(96, 32, generator=gen)
    targets = torch.randint(0, 96, (200,), generator=gen)
    targets[::7] = IGNORE_INDEX
    results = []
    for chunk_bytes in (64 * 96 * 4, 2**40):
        monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_bytes)
        assert loss_module.chunk_tokens(96, 4) == (64 if chunk_bytes < 2**20 else 2**40 // (96 * 4))
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets)
        (loss * 0.5).backward()
        with torch.no_grad():  # eval: the loss alone, no gradients computed
            assert float(linear_cross_entropy(h, w, targets)) == float(loss)
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_a_frozen_lm_head_gets_no_gradient() -> None:
    """Under LoRA the lm_head is frozen: only the hidden states' gradient is computed."""
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(10, 8, generator=gen), torch.randn(16, 8, generator=gen)
    targets = torch.randint(0, 16, (10,), generator=gen)
    got_hidden, want_hidden = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = linear_cross_entropy(got_hidden, weight, targets)
    got.backward()
    want = torch.nn.functional.cross_entropy(want_hidden @ weight.t(), targets)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_hidden.grad, want_hidden.grad)
    assert weight.grad is None
