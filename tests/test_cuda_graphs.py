"""The fixed-shape path that CUDA graphs replay, checked eagerly on the CPU reference layers.

Capture itself needs CUDA and TE (tests/gpu/test_te_cuda_graphs.py); everything around it is ours
and runs here: rows padded to the token budget with padding documents, `cu_seqlens` padded
with zero-length documents, the per-layer fixed-argument call, the routing in the adapter, and
when FP8 replays are told to cast their weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_hf_model
from torch import nn

import te_llama
from te_llama.errors import BackendUnavailableError
from te_llama.model.convert import decoder_layers
from te_llama.train.batching import collate_packed, max_docs_per_batch
from te_llama.train.cuda_graphs import (
    GraphedLayers,
    StaticShape,
    capture_cuda_graphs,
    even_cu_seqlens,
    install_graphs,
    installed_graphs,
    padded_cu_seqlens,
    shared_buffer_sets,
    static_layer_calls,
)
from te_llama.train.data import IGNORE_INDEX
from te_llama.train.layerwise_adamw import LayerwiseAdamW

LOGITS_ATOL = 1e-5  # float32, same math, different document count: summation order only


def test_padded_cu_seqlens_appends_empty_documents() -> None:
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    assert padded_cu_seqlens(cu, 4).tolist() == [0, 5, 12, 12, 12]
    assert padded_cu_seqlens(cu, 2) is cu
    with pytest.raises(ValueError, match="at most 1"):
        padded_cu_seqlens(cu, 1)
    assert even_cu_seqlens(10, 4, 5, torch.device("cpu")).tolist() == [0, 4, 8, 10, 10, 10]
    with pytest.raises(ValueError, match="max_docs=2"):
        even_cu_seqlens(10, 4, 2, torch.device("cpu"))


def test_collate_packed_pads_to_the_budget_without_loss_on_padding() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = collate_packed(examples, with_cu_seqlens=True, pad_to=12, pad_token_id=0, max_doc_len=4)
    inputs = batch.inputs
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0]]
    assert inputs["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 7]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12]
    assert inputs["max_length_q"] == 4
    assert (batch.real_tokens, batch.padded_tokens) == (5, 12)
    with pytest.raises(ValueError, match="do not fit"):
        collate_packed(examples, pad_to=4)


def test_max_docs_per_batch_counts_padding_documents() -> None:
    lengths = [3, 2, 7]
    plans = [[[0, 1], [2]], [[2, 0]]]
    # budget 12, documents of at most 4: [0,1] leaves 7 -> 2 pads (4 docs); [2] leaves 5 -> 2 pads (3 docs)
    assert max_docs_per_batch(plans, lengths, budget=12, max_doc_len=4) == 4


def _static_model(arch: str, shape: StaticShape):
    """A reference model whose training forwards take the fixed-shape path, run eagerly."""
    model = te_llama.convert(random_hf_model(arch), backend="reference", fuse_qkv=True).train()
    shape, padded_tokens, calls = static_layer_calls(model, shape)
    install_graphs(model, GraphedLayers(shape, padded_tokens, calls, "fp32"))
    return model


@pytest.mark.parametrize("arch", ["llama3.1-gqa-llama3-rope", "qwen2-qkv-bias-tied"])
def test_fixed_shape_path_matches_the_unpadded_batch(arch: str) -> None:
    """Padding documents and empty documents change nothing for the real tokens: logits and grads."""
    torch.manual_seed(1)
    docs = [torch.randint(0, 50, (n,)).tolist() for n in (9, 14, 5)]
    examples = [{"input_ids": d, "labels": d} for d in docs]
    plain = collate_packed(examples, with_cu_seqlens=True).inputs
    padded = collate_packed(examples, with_cu_seqlens=True, pad_to=40, max_doc_len=16).inputs
    eager = te_llama.convert(random_hf_model(arch), backend="reference", fuse_qkv=True).train()
    static = _static_model(arch, StaticShape(tokens=40, max_docs=8, max_seqlen=16))
    want = eager(**plain)
    got = static(**padded)
    real = plain["input_ids"].shape[1]
    torch.testing.assert_close(got.logits[:, :real], want.logits, rtol=0, atol=LOGITS_ATOL)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=LOGITS_ATOL)
    want.loss.backward()
    got.loss.backward()
    for (name, p_eager), p_static in zip(eager.named_parameters(), static.parameters()):
        if p_eager.grad is not None:
            torch.testing.assert_close(p_static.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert installed_graphs(static).eager_batches == 0


def test_other_shapes_and_no_grad_run_eagerly() -> None:
    model = _static_model("llama2-mha", StaticShape(tokens=40, max_docs=4, max_seqlen=16))
    ids = torch.randint(0, 50, (1, 24))
    with torch.no_grad():  # eval / generate: never the fixed-shape path
        reference = copy.deepcopy(model)
        install_graphs(reference, None)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert installed_graphs(model).eager_batches == 0
    model(ids)  # a training batch of another size: eager, counted
    assert installed_graphs(model).eager_batches == len(model.model.layers)


def test_capture_refuses_models_without_te_layers() -> None:
    model = te_llama.convert(random_hf_model("llama2-mha"), backend="reference")
    with pytest.raises(BackendUnavailableError, match="backend='te'"):
        capture_cuda_graphs(model, StaticShape(32, 2, 16), "bf16")


def test_release_undoes_a_half_done_capture() -> None:
    """What a capture that ran out of memory leaves behind (in-place gradient buffers, no graphs) is undone."""
    from te_llama.train.cuda_graphs import release_cuda_graphs

    model = te_llama.convert(random_hf_model("llama2-mha"), backend="reference", fuse_qkv=True).train()
    weight = model.model.layers[0].self_attention.proj.weight
    weight.main_grad, weight.overwrite_main_grad = torch.zeros_like(weight), True
    weight.grad = weight.main_grad
    release_cuda_graphs(model)
    assert not hasattr(weight, "main_grad") and weight.grad is None
    assert installed_graphs(model) is None
    model(torch.randint(0, 50, (1, 12)), labels=torch.randint(0, 50, (1, 12))).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_shared_buffer_sets_are_one_layer_each_and_refuse_unequal_layers() -> None:
    layers = [[torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4, 3))] for _ in range(5)]
    sets = shared_buffer_sets(layers, 2)
    assert len(sets) == 2 and [tuple(b.shape) for b in sets[0]] == [(6, 4), (4, 3)]
    assert sets[0][0].data_ptr() != sets[1][0].data_ptr() and not sets[1][1].any()
    layers[3][1] = torch.nn.Parameter(torch.randn(4, 5))
    with pytest.raises(ValueError, match="layer 3"):
        shared_buffer_sets(layers, 2)


def recording_fp8_model(calls_seen: list[dict]) -> nn.Module:
    """A reference model on the fixed-shape path whose FP8 'graphs' record the keyword arguments they get."""
    model = te_llama.convert(random_hf_model("llama2-mha"), backend="reference", fuse_qkv=True).train()
    shape, padded, calls = static_layer_calls(model, StaticShape(tokens=32, max_docs=4, max_seqlen=16))

    def recording(call):
        def run(tokens, cu_seqlens, **kwargs):
            calls_seen.append(kwargs)
            return call(tokens, cu_seqlens)
        return run

    install_graphs(model, GraphedLayers(shape, padded, {k: recording(c) for k, c in calls.items()}, "fp8"))
    return model


@pytest.mark.parametrize("layerwise", [False, True])
def test_graphs_cast_only_in_the_first_forward_after_an_optimizer_step(layerwise: bool) -> None:
    """Untracked, every FP8 replay casts its weights. track_weight_updates: micro-batches after the
    first one of a step reuse the FP8 copies; any optimizer.step() (AdamW or LayerwiseAdamW) makes
    the next forward cast again."""
    seen: list[dict] = []
    model = recording_fp8_model(seen)
    ids = torch.randint(0, 50, (2, 16))
    model(input_ids=ids, labels=ids)
    model(input_ids=ids, labels=ids)
    assert seen and all(kw == {"is_first_microbatch": True} for kw in seen), "untracked: every replay casts"
    seen.clear()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LayerwiseAdamW(model, [], lr=1e-2) if layerwise else torch.optim.AdamW(params, lr=1e-2)
    installed_graphs(model).track_weight_updates(optimizer)
    layers = len(decoder_layers(model))

    def casts_per_forward() -> list[bool]:
        return [kw["is_first_microbatch"] for kw in seen[::layers]]

    for _ in range(2):  # two steps of two micro-batches
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert casts_per_forward() == [True, False, True, False]
    assert len(seen) == 4 * layers
    assert all(len({kw["is_first_microbatch"] for kw in seen[i:i + layers]}) == 1 for i in range(0, len(seen), layers))


@pytest.mark.parametrize("returns_copies", [True, False])
def test_graphs_accumulate_only_where_te_returns_copies_of_their_gradients(monkeypatch, returns_copies) -> None:
    """A graph's gradients reach autograd from its static buffers; TE before 2.19 handed over the buffers
    themselves, which the next micro-batch's replay overwrites: accumulation is then refused (a faked TE)."""
    import sys
    import types

    from te_llama.train import cuda_graphs
    from te_llama.train.config import ConfigError, resolve_config
    from te_llama.train.step import Runtime, resolve_features

    def make_graphed_callables(modules, sample_args, clone_param_grads_on_return=True): ...

    def older_make_graphed_callables(modules, sample_args): ...

    fake = types.ModuleType("transformer_engine")
    fake.__version__ = "2.8.0"
    te = types.SimpleNamespace(make_graphed_callables=make_graphed_callables if returns_copies else
                               older_make_graphed_callables)
    monkeypatch.setitem(sys.modules, "transformer_engine", fake)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te)
    monkeypatch.setattr(cuda_graphs, "te_import_error", lambda: None)  # the fake TE above imports
    gpu = Runtime(torch.device("cuda"), "te", "bf16", torch.bfloat16)
    assert resolve_features(resolve_config(grad_accum=1), gpu, None, 1).cuda_graphs
    assert resolve_features(resolve_config(grad_accum=2), gpu, None, 1).cuda_graphs == returns_copies
    if not returns_copies:
        with pytest.raises(ConfigError, match=r"Transformer Engine 2\.8\.0 hands a CUDA graph's gradients to autograd "
                                              r"in the graph's own buffers.*use --grad-accum 1, or upgrade"):
            resolve_features(resolve_config(grad_accum=2, cuda_graphs=True), gpu, None, 1)
