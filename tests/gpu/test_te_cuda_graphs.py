"""CUDA-graphed TE layers against the same layers run eagerly, on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_hf_model, te_unavailable_reason
from torch import nn

import te_llama
from te_llama.model.convert import decoder_layers
from te_llama.train.batching import collate_packed
from te_llama.train.cuda_graphs import (
    StaticShape,
    capture_cuda_graphs,
    installed_graphs,
)
from te_llama.train.layerwise_adamw import LayerwiseAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(te_unavailable_reason() is not None,
                                                  reason=te_unavailable_reason() or "")]

DEVICE = "cuda"
STEPS = 4
BUDGET, MAX_DOC = 1024, 256
# A graph replays the kernels eager mode launches, on the same inputs: the losses may differ
# only by kernel choices (cuBLAS heuristics can pick another algorithm under capture).
GRAPH_LOSS_REL = {"bf16": 2e-3, "fp8": 5e-3}
GRAPH_PARAM_REL_L2 = {"bf16": 1e-2, "fp8": 2e-2}


def family(precision: str) -> str:
    return "bf16" if precision == "bf16" else "fp8"


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def packed_batches(vocab: int, count: int, seed: int = 0) -> list[dict]:
    """Rows of random documents packed into the budget, then padded to it (different each batch)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        docs, used = [], 0
        while True:
            n = int(torch.randint(8, MAX_DOC + 1, (1,), generator=gen))
            if used + n > BUDGET - 40:
                break
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            docs.append({"input_ids": ids, "labels": ids})
            used += n
        batch = collate_packed(docs, with_cu_seqlens=True, pad_to=BUDGET, max_doc_len=MAX_DOC)
        batches.append({k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.inputs.items()})
    return batches


def train(model, batches: list[dict], precision: str, grad_accum: int, layerwise: bool = False,
          reused_grad_buffers: int = 0, kernel: str = "torch", track_updates: bool = False,
          in_backward: bool = True, defer: bool = True, max_norm: float = 0.0) -> list[float]:
    """AdamW steps of `grad_accum` micro-batches each; the mean micro-batch loss per step."""
    optimizer = LayerwiseAdamW(model, list(decoder_layers(model)), reused_grad_buffers=reused_grad_buffers,
                               kernel=kernel, in_backward=in_backward, defer_to_next_forward=defer, lr=1e-4,
                               fused=True) if layerwise else \
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    if track_updates:  # FP8 graphs cast the weights only in the first micro-batch after a step
        installed_graphs(model).track_weight_updates(optimizer)
    losses = []
    for start in range(0, len(batches), grad_accum):
        total = 0.0
        for inputs in batches[start:start + grad_accum]:
            with te_llama.autocast(precision):
                loss = model(**inputs).loss
            (loss / grad_accum).backward()
            total += float(loss.detach()) / grad_accum
        if max_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


CASES = [  # (arch, precision, fuse_qkv, grad_accum)
    ("llama3.1-gqa-llama3-rope", "bf16", True, 1),
    ("llama3.1-gqa-llama3-rope", "fp8", True, 1),
    ("qwen2-qkv-bias-tied", "bf16", True, 2),
    ("qwen2-qkv-bias-tied", "fp8", True, 2),
    ("mistral-gqa", "bf16", False, 1),  # split Q/K/V: weight gradients through the graph's buffers
    ("llama3.1-gqa-llama3-rope", "fp8-delayed", True, 1),  # amax history updated around the graphs
    ("llama3.1-gqa-llama3-rope", "fp8-current", True, 2),
    ("qwen3-gqa-head-dim", "bf16", True, 1),  # q/k norms inside the graph
    ("qwen3-gqa-head-dim", "fp8", True, 1),
    ("phi3-mha", "bf16", True, 2),
    ("phi3-mha", "fp8", False, 1),
    ("gemma-mqa", "bf16", True, 1),  # tanh-GeGLU, zero-centered norms
    ("gemma-mqa", "fp8", True, 1),
]


@pytest.mark.parametrize(("arch", "precision", "fuse_qkv", "grad_accum"), CASES,
                         ids=[f"{a}-{p}-{'fused' if f else 'split'}-accum{g}" for a, p, f, g in CASES])
def test_graphed_training_matches_eager(arch: str, precision: str, fuse_qkv: bool, grad_accum: int,
                                        record_metric) -> None:
    hf = random_hf_model(arch, gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    eager = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=fuse_qkv).train()
    graphed = te_llama.convert(hf, backend="te", fuse_qkv=fuse_qkv).train()
    batches = packed_batches(hf.config.vocab_size, STEPS * grad_accum)
    most_docs = max(int(b["cu_seq_lens_q"].numel()) - 1 for b in batches)
    graphs = capture_cuda_graphs(graphed, StaticShape(BUDGET, most_docs + 2, MAX_DOC), precision,
                                 accumulate_grads=grad_accum > 1)
    initial = [p.detach().clone() for p in eager.parameters()]
    want = train(eager, batches, precision, grad_accum)
    got = train(graphed, batches, precision, grad_accum)
    loss_gap = max(abs(g - w) / w for g, w in zip(got, want))
    param_gap = max(rel_l2(pg, pe) for pg, pe in zip(graphed.parameters(), eager.parameters()))
    update_gap = max(rel_l2(pg - p0, pe - p0) for pg, pe, p0 in zip(graphed.parameters(), eager.parameters(), initial)
                     if bool((pe != p0).any()))
    record_metric(arch=arch, precision=precision, fuse_qkv=fuse_qkv, grad_accum=grad_accum,
                  grads_written_in_place=bool(graphs.grad_buffers), eager_losses=want, graphed_losses=got,
                  max_loss_rel_gap=loss_gap, max_param_rel_l2=param_gap, max_update_rel_l2=update_gap,
                  eager_batches=graphs.eager_batches)
    assert graphs.eager_batches == 0, "a training batch missed the graphs"
    assert bool(graphs.grad_buffers) == fuse_qkv
    moved = [bool((pe != p0).any()) for pe, p0 in zip(eager.parameters(), initial) if pe.dim() == 2]
    assert all(moved), "a weight matrix did not train"  # random tokens: the loss need not fall in 4 steps
    assert loss_gap <= GRAPH_LOSS_REL[family(precision)]
    assert param_gap <= GRAPH_PARAM_REL_L2[family(precision)]


LAYERWISE_CASES = [  # (precision, graphs, shared gradient buffers, update kernel)
    ("bf16", True, 0, "torch"), ("fp8", True, 0, "torch"), ("fp8-delayed", True, 2, "torch"),
    ("fp8-current", True, 1, "torch"), ("bf16", True, 2, "torch"), ("bf16", False, 0, "torch"),
    ("bf16", True, 2, "triton"), ("fp8-delayed", True, 2, "triton")]
# Triton's kernel rounds to BF16 a last bit apart from torch's on some elements; with BF16 weights
# and lr 1e-4 an update is about one ulp, so parameters drift apart by up to a ulp (2**-8 relative),
# and under FP8 a changed weight also changes its quantization scale.
TRITON_LOSS_REL = 2e-3
TRITON_PARAM_REL_L2 = {"bf16": 2**-8, "fp8": 1e-2}


@pytest.mark.parametrize(("precision", "graphs", "shared", "kernel"), LAYERWISE_CASES,
                         ids=[f"{p}-{'graphs' if g else 'eager'}-shared{n}-{k}" for p, g, n, k in LAYERWISE_CASES])
def test_layerwise_adamw_trains_like_adamw(precision: str, graphs: bool, shared: int, kernel: str,
                                           record_metric) -> None:
    """LayerwiseAdamW (updates on a second stream during backward) vs AdamW after backward;
    with `shared`, the graphed layers' weight gradients live in that many buffer sets."""
    hf = random_hf_model("llama3.1-gqa-llama3-rope", gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    plain = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=True).train()
    overlapped = te_llama.convert(hf, backend="te", fuse_qkv=True).train()
    batches = packed_batches(hf.config.vocab_size, 2 * STEPS)
    if graphs:
        most_docs = max(int(b["cu_seq_lens_q"].numel()) - 1 for b in batches)
        for model, buffers in ((plain, 0), (overlapped, shared)):
            capture_cuda_graphs(model, StaticShape(BUDGET, most_docs + 2, MAX_DOC), precision, accumulate_grads=False,
                                shared_grad_buffers=buffers)
    want = train(plain, batches, precision, 1)
    got = train(overlapped, batches, precision, 1, layerwise=True, reused_grad_buffers=shared, kernel=kernel)
    loss_gap = max(abs(g - w) / w for g, w in zip(got, want))
    param_gap = max(rel_l2(po, pp) for po, pp in zip(overlapped.parameters(), plain.parameters()))
    record_metric(precision=precision, graphs=graphs, shared_grad_buffers=shared, kernel=kernel, adamw_losses=want,
                  layerwise_losses=got, max_loss_rel_gap=loss_gap, max_param_rel_l2=param_gap)
    assert want[-1] < want[0] and got[-1] < got[0]
    if kernel == "torch":  # the same kernel on the same gradients: the same training
        assert loss_gap <= GRAPH_LOSS_REL[family(precision)]
        assert param_gap <= GRAPH_PARAM_REL_L2[family(precision)]
    else:
        assert loss_gap <= TRITON_LOSS_REL and param_gap <= TRITON_PARAM_REL_L2[family(precision)]


def twin_graphed_models(arch: str, precision: str, graphs: bool = True, **capture
                        ) -> tuple[nn.Module, nn.Module, list[dict]]:
    """Two TE conversions of one random HF model, both captured as graphs (unless `graphs` is False), and packed
    batches for them."""
    hf = random_hf_model(arch, gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    first = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=True).train()
    second = te_llama.convert(hf, backend="te", fuse_qkv=True).train()
    batches = packed_batches(hf.config.vocab_size, 2 * STEPS)
    most_docs = max(int(b["cu_seq_lens_q"].numel()) - 1 for b in batches)
    for model in (first, second) if graphs else ():
        capture_cuda_graphs(model, StaticShape(BUDGET, most_docs + 2, MAX_DOC), precision, **capture)
    return first, second, batches


@pytest.mark.parametrize(("graphs", "grad_accum", "max_norm"), [(True, 2, 1.0), (True, 1, 0.5), (False, 2, 0.0)])
def test_updates_deferred_to_the_next_forward_train_bit_identically(graphs: bool, grad_accum: int, max_norm: float,
                                                                      record_metric) -> None:
    """LayerwiseAdamW after backward: updates queued on the side stream and awaited layer by layer in the next
    forward give the same training as the same kernel awaited at the end of step() (clipping, accumulation)."""
    inline, deferred, batches = twin_graphed_models("llama3.1-gqa-llama3-rope", "fp8-delayed", graphs,
                                                    accumulate_grads=grad_accum > 1)
    settings = {"layerwise": True, "kernel": "triton", "in_backward": False, "max_norm": max_norm}
    initial = [p.detach().clone() for p in inline.parameters()]
    want = train(inline, batches, "fp8-delayed", grad_accum, defer=False, **settings)
    got = train(deferred, batches, "fp8-delayed", grad_accum, defer=True, **settings)
    torch.cuda.synchronize()
    record_metric(graphs=graphs, grad_accum=grad_accum, max_norm=max_norm, inline_losses=want, deferred_losses=got)
    assert all(bool((p != p0).any()) for p, p0 in zip(inline.parameters(), initial) if p.dim() == 2)
    assert got == want
    for (name, p), q in zip(inline.named_parameters(), deferred.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_deferred_updates_are_awaited_by_each_layers_next_forward() -> None:
    """After step() every layer's update is queued; each layer's next forward takes its own wait off the queue."""
    hf = random_hf_model("llama3.1-gqa-llama3-rope", gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    model = te_llama.convert(hf, backend="te", fuse_qkv=True).train()
    layers = list(decoder_layers(model))
    optimizer = LayerwiseAdamW(model, layers, kernel="triton", in_backward=False, lr=1e-4)
    inputs = packed_batches(hf.config.vocab_size, 1)[0]
    with te_llama.autocast("bf16"):
        model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert sorted(optimizer._pending) == list(range(len(layers)))
    with torch.no_grad(), te_llama.autocast("bf16"):
        model(**inputs)
    assert not optimizer._pending


@pytest.mark.parametrize("precision", ["fp8", "fp8-current"])
def test_fp8_weights_cast_once_per_step_with_accumulation(precision: str, record_metric) -> None:
    """Gradient accumulation over FP8 graphs told when the optimizer steps: the weights are cast
    in the first micro-batch only, and the later ones read the same FP8 copies they would have made."""
    every, once, batches = twin_graphed_models("qwen2-qkv-bias-tied", precision, accumulate_grads=True)
    want = train(every, batches, precision, 2)
    got = train(once, batches, precision, 2, track_updates=True)
    record_metric(precision=precision, every_microbatch=want, once_per_step=got)
    assert got[-1] < got[0]
    assert got == want


def test_graphed_model_evaluates_and_exports_eagerly(tmp_path) -> None:
    hf = random_hf_model("llama2-mha", gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    model = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=True).train()
    capture_cuda_graphs(model, StaticShape(BUDGET, 8, MAX_DOC), "bf16")
    ids = torch.randint(0, hf.config.vocab_size, (2, 100), device=DEVICE)
    model.eval()
    with torch.no_grad(), te_llama.autocast("bf16"):
        got = model(ids).logits
        want = hf.eval()(ids).logits
    assert rel_l2(got, want) <= 2e-2
    te_llama.save_pretrained(model, tmp_path)
    assert (tmp_path / "config.json").is_file()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_finetune_default_uses_graphs_and_matches_eager(tmp_path, caplog, grad_accum: int, record_metric) -> None:
    """`te-llama finetune` on the built-in model: graphs on (the default) vs --no-cuda-graphs."""
    import logging

    from te_llama.train.config import resolve_config
    from te_llama.train.recipe import finetune

    caplog.set_level(logging.INFO, logger="te_llama")
    results = {}
    for graphs in (True, False):
        config = resolve_config(output_dir=str(tmp_path / f"graphs-{graphs}"), backend="te", precision="bf16",
                                max_steps=12, grad_accum=grad_accum, cuda_graphs=graphs, eval_fraction=0.0,
                                save_every=0, tensorboard=False, cache_dir=str(tmp_path / "cache"))
        results[graphs] = finetune(config)
    messages = caplog.text
    gap = abs(results[True].final_loss - results[False].final_loss) / results[False].final_loss
    record_metric(grad_accum=grad_accum, graphed_loss=results[True].final_loss,
                  eager_loss=results[False].final_loss, relative_gap=gap)
    assert "captured CUDA graphs" in messages and "does not fit the CUDA graphs" not in messages
    assert gap <= 1e-2  # padded rows change GEMM shapes (and summation order), nothing else


def test_released_graphs_train_like_eager(record_metric) -> None:
    """The memory fallback: capture, find no room (forced), release, train eagerly."""
    from te_llama.train.cuda_graphs import graphs_leave_room, release_cuda_graphs

    hf = random_hf_model("llama2-mha", gpu_size=True, device=DEVICE, dtype=torch.bfloat16)
    eager = te_llama.convert(copy.deepcopy(hf), backend="te", fuse_qkv=True).train()
    released = te_llama.convert(hf, backend="te", fuse_qkv=True).train()
    capture_cuda_graphs(released, StaticShape(BUDGET, 8, MAX_DOC), "bf16", accumulate_grads=False)
    fits, detail = graphs_leave_room(released, torch.device(DEVICE), headroom_bytes=10**15)
    assert not fits and "needed later" in detail
    release_cuda_graphs(released)
    assert installed_graphs(released) is None
    batches = packed_batches(hf.config.vocab_size, 2)
    want, got = train(eager, batches, "bf16", 1), train(released, batches, "bf16", 1)
    record_metric(eager_losses=want, released_losses=got)
    assert got == want


def finetune_both_ways(tmp_path, caplog, switch: str, **settings) -> tuple[dict[bool, float], float]:
    """`te-llama finetune` (built-in model and data, 12 steps, logs captured) with `switch` on and
    off: the final losses and their relative gap."""
    import logging

    from te_llama.train.config import resolve_config
    from te_llama.train.recipe import finetune

    caplog.set_level(logging.INFO, logger="te_llama")
    results = {}
    for on in (True, False):
        config = resolve_config(output_dir=str(tmp_path / f"{switch}-{on}"), backend="te", max_steps=12,
                                eval_fraction=0.0, save_every=0, tensorboard=False,
                                cache_dir=str(tmp_path / "cache"), **{switch: on}, **settings)
        results[on] = finetune(config).final_loss
    return results, abs(results[True] - results[False]) / results[False]


def test_finetune_overlaps_the_optimizer_without_clipping(tmp_path, caplog, record_metric) -> None:
    """`te-llama finetune --max-grad-norm 0`: LayerwiseAdamW + graphs with shared gradient buffers
    (the default then) vs --no-overlap-optimizer."""
    losses, gap = finetune_both_ways(tmp_path, caplog, "overlap_optimizer", precision="bf16", max_grad_norm=0.0)
    record_metric(overlapped_loss=losses[True], adamw_loss=losses[False], relative_gap=gap)
    assert caplog.text.count("captured CUDA graphs") == 2
    assert caplog.text.count("each layer updated during backward") == 1
    assert gap <= 1e-6
