"""The TE LoRA layer against transformers + PEFT and its reference twin; the FP8 base; LoRA training,
CUDA graphs and the PEFT export, on the GPU.

Run on the device: `bash scripts/gpu_check.sh -k lora` (or the whole GPU suite).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import random_hf_model, te_unavailable_reason
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.model.convert import release_weight_transposes
from te_llama.model.layers import build_decoder_layer
from te_llama.model.builtin import builtin_tokenizer
from te_llama.model.layers.hf_adapter import ModelContext
from te_llama.model.lora import LoraSpec, adapter_parameters, family_targets
from te_llama.model.peft_adapter import load_peft_adapter, read_adapter_config
from te_llama.precision import check_precision_available, make_recipe
from te_llama.train.config import resolve_config
from te_llama.train.metrics import read_metrics
from te_llama.train.recipe import finetune

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(te_unavailable_reason() is not None,
                                                  reason=te_unavailable_reason() or "")]
peft = pytest.importorskip("peft")

DEVICE = "cuda"
RANK, ALPHA = 16, 32.0
ARCHS = ["llama3.1-gqa-llama3-rope", "qwen2-qkv-bias-tied", "qwen3-gqa-head-dim", "phi3-mha", "gemma-mqa"]
FP8_BASE_RECIPES = ["fp8-current", "fp8-block"]
# As tests/gpu/test_te_backend.py judges the TE layers: against the FP32 oracle, no worse than HF's own BF16.
BF16_REL_L2 = 2e-2          # a sanity bound; the criterion is HF_BF16_SLACK
HF_BF16_SLACK = 1.15        # TE LoRA in BF16 at most this much less accurate than PEFT's own BF16
FP8_BASE_BYTES = 0.6        # FP8 base layers' bytes over BF16 ones: 1 byte per weight instead of 2, plus the
                            # norms, the FP32 adapters (~5% at rank 16 on these widths) and the scales
FP8_BASE_VS_CAST_REL_L2 = 2e-2  # FP8 base vs a BF16 base cast to FP8 each forward: the same recipe quantizes
                                # the same weights alike; only the kernels may differ
TRANSPOSES_LEFT = 0.5       # bytes a backward leaves on an FP8 base, over its bytes (kept transposes: ~0.9)
GRAPH_LOSS_REL = 2e-3       # graphed vs eager LoRA training (tests/gpu/test_te_cuda_graphs.py's BF16 bound)


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def token_batch(vocab: int, batch: int = 2, seq: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def fp8_unavailable(precision: str) -> str | None:
    try:
        check_precision_available(precision)
    except Exception as exc:  # noqa: BLE001 - the reason is the skip message
        return str(exc)
    return None


@pytest.fixture(scope="module")
def gpu_base(tmp_path_factory):
    """The GPU-size Llama-3.1 GQA test model (BF16) with the built-in tokenizer, as a --model folder."""
    folder = tmp_path_factory.mktemp("base")
    random_hf_model("llama3.1-gqa-llama3-rope", gpu_size=True, dtype=torch.bfloat16).save_pretrained(folder)
    builtin_tokenizer().save_pretrained(folder)  # its ids are below the model's vocabulary of 1024
    return folder


def peft_adapters(model) -> dict[str, torch.nn.Parameter]:
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}


def lora_models(arch: str, fuse_qkv: bool):
    """PEFT on HF float32 (oracle) and BF16, te-llama's TE LoRA layers in BF16 and the reference ones in
    float32: one base (drawn in BF16) and the same random nonzero adapters in all four."""
    hf16 = random_hf_model(arch, gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    hf32 = copy.deepcopy(hf16).float()
    lora = LoraSpec(RANK, ALPHA, 0.0, family_targets(te_llama.ArchitectureSpec.from_hf_config(hf16.config)))
    te16 = te_llama.convert(copy.deepcopy(hf16), backend="te", fuse_qkv=fuse_qkv, lora=lora)
    ref32 = te_llama.convert(copy.deepcopy(hf32), backend="reference", fuse_qkv=fuse_qkv, lora=lora)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.targets), task_type="CAUSAL_LM")
    peft32, peft16 = peft.get_peft_model(hf32, config), peft.get_peft_model(hf16, copy.deepcopy(config))
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    with torch.no_grad():
        for key, param in adapter_parameters(te16).items():
            param.copy_(0.02 * torch.randn(param.shape, device=DEVICE, generator=gen))
            for other in (adapter_parameters(ref32), peft_adapters(peft32), peft_adapters(peft16)):
                other[key].copy_(param)
    return lora, {"peft32": peft32, "peft16": peft16, "te16": te16, "ref32": ref32}


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
@pytest.mark.parametrize("arch", ARCHS)
def test_te_lora_bf16_matches_peft_and_reference(arch: str, fuse_qkv: bool, record_metric) -> None:
    """TE LoRA in BF16 against PEFT in FP32: no less accurate than PEFT's own BF16 (logits and every
    adapter gradient), and close to the reference LoRA layer."""
    _, models = lora_models(arch, fuse_qkv)
    ids = token_batch(models["te16"].config.vocab_size)
    outs = {}
    for name, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name.endswith("16")):
            outs[name] = model(ids, labels=ids)
        outs[name].loss.backward()
    oracle = outs["peft32"].logits
    errors = {"te16_vs_peft32": rel_l2(outs["te16"].logits, oracle),
              "peft16_vs_peft32": rel_l2(outs["peft16"].logits, oracle),
              "te16_vs_ref32": rel_l2(outs["te16"].logits, outs["ref32"].logits),
              "ref32_vs_peft32": rel_l2(outs["ref32"].logits, oracle)}
    want = peft_adapters(models["peft32"])
    te_err = {k: rel_l2(p.grad, want[k].grad) for k, p in adapter_parameters(models["te16"]).items()}
    hf_err = {k: rel_l2(p.grad, want[k].grad) for k, p in peft_adapters(models["peft16"]).items()}
    worst = max(te_err, key=te_err.get)
    record_metric(arch=arch, fuse_qkv=fuse_qkv, **errors, worst_grad=worst, worst_grad_te16=te_err[worst],
                  worst_grad_peft16=hf_err[worst])
    assert errors["ref32_vs_peft32"] <= 1e-5
    assert errors["te16_vs_ref32"] <= BF16_REL_L2
    assert errors["te16_vs_peft32"] <= HF_BF16_SLACK * errors["peft16_vs_peft32"]
    for key, error in te_err.items():
        assert error <= max(BF16_REL_L2, HF_BF16_SLACK * hf_err[key]), f"{key}: {error:.3g} vs PEFT {hf_err[key]:.3g}"
    assert not [n for n, p in models["te16"].named_parameters() if p.grad is not None and ".lora." not in n]


def _layers_bytes(hf_config, spec, lora, recipe) -> tuple[int, torch.nn.ModuleList]:
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    context = ModelContext(hf_config, spec, 32)
    layers = torch.nn.ModuleList(build_decoder_layer("te", spec, i, True, DEVICE, torch.bfloat16, context, lora, recipe)
                                 for i in range(spec.num_layers))
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - start, layers


@pytest.mark.parametrize("precision", FP8_BASE_RECIPES)
def test_fp8_base_weights_are_fp8_and_half_the_bytes(precision: str, record_metric) -> None:
    """The frozen base in TE FP8 tensors: half the bytes, the forward of a BF16 base cast to FP8, and no
    transposed copy left once a backward is done (`release_weight_transposes`)."""
    reason = fp8_unavailable(precision)
    if reason:
        pytest.skip(reason)
    import transformer_engine.pytorch as te

    hf = random_hf_model("llama3.1-gqa-llama3-rope", gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    spec = te_llama.ArchitectureSpec.from_hf_config(hf.config)
    lora = LoraSpec(RANK, ALPHA, 0.0, family_targets(spec))
    bf16_bytes, _ = _layers_bytes(hf.config, spec, lora, None)
    fp8_bytes, layers = _layers_bytes(hf.config, spec, lora, make_recipe(precision))
    weights = [getattr(m, n) for layer in layers for m in layer.gemm_modules() for n in m.weight_names]
    assert weights and all(isinstance(w, te.QuantizedTensor) and not w.requires_grad for w in weights)
    del layers

    bf16 = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=True, lora=lora)
    fp8 = te_llama.convert(hf, backend="te", fuse_qkv=True, lora=lora, base_recipe=make_recipe(precision)).train()
    ids = token_batch(hf.config.vocab_size, batch=4, seq=256)
    with torch.no_grad(), te_llama.autocast(precision):
        forward_gap = rel_l2(fp8(ids).logits, bf16(ids).logits)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with te_llama.autocast(precision):
        loss = fp8(ids, labels=ids).loss
    loss.backward()
    release_weight_transposes(fp8)
    del loss
    torch.cuda.synchronize()
    grads = {key: p.grad for key, p in adapter_parameters(fp8).items()}
    left = torch.cuda.memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads.values())
    record_metric(precision=precision, bf16_layer_bytes=bf16_bytes, fp8_layer_bytes=fp8_bytes,
                  ratio=fp8_bytes / bf16_bytes, forward_rel_l2_vs_bf16_base=forward_gap, bytes_left_by_backward=left)
    assert fp8_bytes <= FP8_BASE_BYTES * bf16_bytes
    assert forward_gap <= FP8_BASE_VS_CAST_REL_L2
    # new adapters: B is zero (PEFT's init), so B's gradients carry the signal and A's are exactly zero
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for key, g in grads.items() if "lora_B" in key)
    assert not any(g.any() for key, g in grads.items() if "lora_A" in key)
    assert left <= TRANSPOSES_LEFT * fp8_bytes


def _finetune(tmp_path, base, name: str, **options):
    return finetune(resolve_config(**({"model": str(base), "output_dir": str(tmp_path / name), "backend": "te",
                                       "lora_rank": RANK, "learning_rate": 1e-3, "max_steps": 12, "max_seq_len": 256,
                                       "batch_size": 4, "eval_fraction": 0.0, "save_every": 0, "tensorboard": False,
                                       "cache_dir": str(tmp_path / "cache")} | options)))


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_lora_finetune_trains_and_graphs_match_eager(base: str, gpu_base, tmp_path, record_metric) -> None:
    """`te-llama finetune --lora-rank` on the GPU test model: it learns, and CUDA graphs (which capture the
    adapters with the frozen layers) train as eager does."""
    options = {"precision": "bf16"} if base == "bf16" else {"lora_base": "fp8"}
    if base == "fp8" and fp8_unavailable("fp8-current"):
        pytest.skip(fp8_unavailable("fp8-current"))
    runs = {graphs: _finetune(tmp_path, gpu_base, f"{base}-{graphs}", cuda_graphs=graphs, **options)
            for graphs in (True, False)}
    losses = {g: [r["loss"] for r in read_metrics(r.output_dir / "metrics.jsonl") if r["kind"] == "train"]
              for g, r in runs.items()}
    gap = max(abs(a - b) / b for a, b in zip(losses[True], losses[False]))
    record_metric(base=base, graphed_losses=losses[True], eager_losses=losses[False], max_loss_rel_gap=gap)
    assert losses[False][-1] < losses[False][0]
    assert gap <= GRAPH_LOSS_REL


def test_te_lora_export_loads_in_vanilla_peft(gpu_base, tmp_path, record_metric) -> None:
    """The PEFT adapter of a TE run, in vanilla PEFT on the FP32 base: the TE model's logits (BF16); the merged
    checkpoint likewise."""
    result = _finetune(tmp_path, gpu_base, "run", precision="bf16", max_steps=6, merge_lora=True)
    lora, base_name = read_adapter_config(result.exported)
    assert base_name == str(gpu_base)
    vanilla = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        gpu_base, dtype=torch.float32).to(DEVICE), result.exported).eval()
    ours = te_llama.from_pretrained(gpu_base, backend="te", torch_dtype=torch.bfloat16, fuse_qkv=True, lora=lora)
    load_peft_adapter(ours, result.exported)
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final-merged", dtype=torch.float32).to(DEVICE)
    ids = token_batch(ours.config.vocab_size, batch=2, seq=200)
    with torch.no_grad():
        want = vanilla(ids).logits
        with te_llama.autocast("bf16"):
            got = ours.eval()(ids).logits
        merged_gap = rel_l2(merged(ids).logits, want)
    record_metric(te16_vs_peft32=rel_l2(got, want), merged_vs_peft32=merged_gap)
    assert rel_l2(got, want) <= BF16_REL_L2
    assert merged_gap <= BF16_REL_L2  # merged into BF16 weights: one rounding of W + B A alpha / r
