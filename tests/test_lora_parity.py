"""te-llama's LoRA layers (reference backend) against transformers + PEFT on the same base and adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import float64_oracle, next_token_loss, padding_mask, random_hf_model
from tolerances import assert_as_accurate_as

import te_llama
from te_llama.model.lora import LoraError, LoraSpec, adapter_parameters, check_targets, family_targets

peft = pytest.importorskip("peft")

MAX_RELATIVE_ERROR = 1e-5  # FP32 logits against PEFT's, relative to their largest
# Against the float64 oracle (tests/tolerances.py), as tests/test_parity.py: the adapters add two small
# GEMMs per projection, summed in the same order as PEFT's, so the same multiples hold.
ERROR_MULTIPLE, FLOOR_ULPS = 8.0, 8.0
RANK, ALPHA = 4, 8.0
SEQ_LEN = 24


def peft_adapters(model) -> dict[str, torch.nn.Parameter]:
    """A PEFT model's adapter parameters under the keys PEFT saves them with (the adapter name removed)."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}


def lora_models(arch: str, fuse_qkv: bool, targets: tuple[str, ...] | None = None, dropout: float = 0.0):
    """te-llama's LoRA model, transformers + PEFT, and PEFT on the float64 oracle: the same base and the
    same random (nonzero) adapters in all three."""
    hf = random_hf_model(arch)
    spec = te_llama.ArchitectureSpec.from_hf_config(hf.config)
    lora = LoraSpec(RANK, ALPHA, dropout, targets or family_targets(spec))
    ours = te_llama.convert(copy.deepcopy(hf), backend="reference", fuse_qkv=fuse_qkv, lora=lora)
    config = {"r": RANK, "lora_alpha": ALPHA, "lora_dropout": dropout, "target_modules": list(lora.targets),
              "task_type": "CAUSAL_LM"}
    oracle = peft.get_peft_model(float64_oracle(hf), peft.LoraConfig(**config))
    reference = peft.get_peft_model(hf, peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        mine, theirs, exact = adapter_parameters(ours), peft_adapters(reference), peft_adapters(oracle)
        assert set(mine) == set(theirs) == set(exact), sorted(set(mine) ^ set(theirs))
        for key, param in mine.items():
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))  # lora_B too: a zero B checks nothing
            theirs[key].copy_(param)
            exact[key].copy_(param.double())
    return ours, reference, oracle


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
def test_lora_logits_and_adapter_grads_match_peft(arch: str, fuse_qkv: bool) -> None:
    ours, reference, oracle = lora_models(arch, fuse_qkv)
    ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    want, got = reference(ids, labels=ids), ours(ids, labels=ids)
    exact_logits = oracle(ids).logits
    assert float((got.logits - want.logits).detach().abs().max() / want.logits.detach().abs().max()) <= \
        MAX_RELATIVE_ERROR
    assert_as_accurate_as(got.logits, want.logits, exact_logits, error_multiple=ERROR_MULTIPLE,
                          floor_ulps=FLOOR_ULPS, name="logits")
    want.loss.backward()
    got.loss.backward()
    next_token_loss(exact_logits, ids).backward()
    mine, theirs, exact = adapter_parameters(ours), peft_adapters(reference), peft_adapters(oracle)
    for key, param in exact.items():
        assert_as_accurate_as(mine[key].grad, theirs[key].grad, param.grad, error_multiple=ERROR_MULTIPLE,
                              floor_ulps=FLOOR_ULPS, name=key)
    frozen = [n for n, p in ours.named_parameters() if p.grad is not None and ".lora." not in n]
    assert not frozen, f"the base must not train: {frozen}"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama3.1-gqa-llama3-rope", "qwen2-qkv-bias-tied", "phi3-odd-gqa-tied"])
def test_lora_padded_batch_matches_peft(arch: str, side: str) -> None:
    ours, reference, _ = lora_models(arch, fuse_qkv=True)
    ids = torch.randint(0, ours.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = padding_mask(side, [0, 5, 11], 20)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert float((got[real] - want[real]).abs().max() / want[real].abs().max()) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("arch", ["mistral-gqa", "qwen3-gqa-head-dim", "gemma-mqa"])
def test_lora_packed_documents_match_peft_on_each_document(arch: str) -> None:
    ours, reference, _ = lora_models(arch, fuse_qkv=True)
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, ours.config.vocab_size, (1, n), generator=gen) for n in (7, 13, 4)]
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        got = ours(torch.cat(docs, dim=1), position_ids=position_ids).logits
        want = torch.cat([reference(d).logits for d in docs], dim=1)
    assert float((got - want).abs().max() / want.abs().max()) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
@pytest.mark.parametrize(("arch", "targets"), [("llama2-mha", ("v_proj", "down_proj")),
                                               ("llama3.1-gqa-llama3-rope", ("up_proj", "k_proj")),
                                               ("phi3-mha", ("qkv_proj",)), ("qwen2-qkv-bias-tied", ("o_proj", "up_proj"))])
def test_some_targets_only(arch: str, targets: tuple[str, ...], fuse_qkv: bool) -> None:
    """Adapters on some outputs of a fused GEMM only (given in any order): the others' rows stay the base's,
    in TE's interleaved Q/K/V layout too."""
    ours, reference, _ = lora_models(arch, fuse_qkv=fuse_qkv, targets=targets)
    assert {key.split(".")[-3] for key in adapter_parameters(ours)} == set(targets)
    ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = reference(ids).logits, ours(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= MAX_RELATIVE_ERROR


def test_dropout_is_on_the_adapter_input_in_training_only() -> None:
    ours, reference, _ = lora_models("llama2-mha", fuse_qkv=True, dropout=0.5)
    ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        evaluated = ours.eval()(ids).logits
        assert float((evaluated - reference.eval()(ids).logits).abs().max()) <= MAX_RELATIVE_ERROR * \
            float(evaluated.abs().max())
        torch.manual_seed(0)
        trained = ours.train()(ids).logits
    assert not torch.allclose(trained, evaluated)


def test_new_adapters_change_nothing_and_only_they_train() -> None:
    hf = random_hf_model("qwen3-mha-bias-tied")
    lora = LoraSpec(RANK, ALPHA, 0.0, family_targets(te_llama.ArchitectureSpec.from_hf_config(hf.config)))
    ours = te_llama.convert(copy.deepcopy(hf), backend="reference", fuse_qkv=True, lora=lora)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, te_llama.convert(hf, backend="reference", fuse_qkv=True)(ids).logits,
                                   rtol=0, atol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.lora.{t}.lora_{ab}.weight" for i in range(2) for t in lora.targets
                         for ab in "AB"}
    assert {p.dtype for n, p in ours.named_parameters() if n in trainable} == {torch.float32}


def test_targets_the_family_does_not_have_are_refused() -> None:
    spec = te_llama.ArchitectureSpec.from_hf_config(random_hf_model("phi3-mha").config)
    with pytest.raises(LoraError, match="--lora-targets q_proj: phi3 stores q/k/v as one qkv_proj.*qkv_proj o_proj"):
        check_targets(("q_proj", "o_proj"), spec)


def test_a_bf16_base_runs_without_autocast() -> None:
    """FP32 adapters beside a BF16 base with no autocast around them (a plain BF16 model's forward): the
    adapters' matmuls run in the base's dtype, as PEFT's do."""
    hf = random_hf_model("llama3.1-gqa-llama3-rope").to(torch.bfloat16)
    spec = te_llama.ArchitectureSpec.from_hf_config(hf.config)
    ours = te_llama.convert(hf, backend="reference", fuse_qkv=True, lora=LoraSpec(RANK, ALPHA, 0.0,
                                                                                  family_targets(spec)))
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(8))
    logits = ours(ids, labels=ids)
    logits.loss.backward()
    assert logits.logits.dtype == torch.bfloat16 and torch.isfinite(logits.logits).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_parameters(ours).values())
