"""The FP8 weight cache's bookkeeping on the CPU, with stand-ins for TE's quantized workspaces.

What TE itself does with the cache (the graphs reading it, the quantization) is checked on the
GPU (tests/gpu/test_te_cuda_graphs.py); here: which weight each workspace belongs to, that a
refresh writes the current weights with both usages on, the errors, and the wiring between
the graphs and LayerwiseAdamW.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_hf_model
from torch import nn

import te_llama
from te_llama.model.convert import decoder_layers
from te_llama.train.cuda_graphs import (
    GraphedLayers,
    StaticShape,
    cast_fp8_weights_after_updates,
    install_graphs,
    static_layer_calls,
)
from te_llama.train.fp8_weight_cache import collect_fp8_weight_cache
from te_llama.train.layerwise_adamw import LayerwiseAdamW


class RoundingQuantizer:
    """Stands in for a TE quantizer: 'quantizes' by rounding to a multiple of 1/4."""

    def __init__(self) -> None:
        self.usage = (True, False)  # as an eval forward leaves TE's weight quantizer

    def copy(self) -> RoundingQuantizer:
        twin = RoundingQuantizer()
        twin.usage = self.usage
        return twin

    def set_usage(self, rowwise: bool, columnwise: bool) -> None:
        self.usage = (rowwise, columnwise)

    def update_quantized(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        assert self.usage == (True, True), "a refresh must keep the columnwise copy the backward reads"
        dst.copy_((src * 4).round() / 4)
        return dst


def workspace_for(weight: torch.Tensor) -> torch.Tensor:
    workspace = torch.zeros_like(weight.detach())
    workspace._quantizer = RoundingQuantizer()
    return workspace


def give_workspaces(layer: nn.Module) -> list[nn.Parameter]:
    """Attach a workspace to each 2-D weight of the layer's modules, as TE names them; return those weights."""
    weights = []
    for module in layer.modules():
        module._fp8_workspaces = {}
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 2:
                module._fp8_workspaces[name] = workspace_for(param)
                weights.append(param)
    return weights


def reference_model() -> nn.Module:
    return te_llama.convert(random_hf_model("llama2-mha"), backend="reference", fuse_qkv=True).train()


def test_refresh_writes_the_current_weights_into_each_workspace() -> None:
    layers = list(decoder_layers(reference_model()))
    expected = {id(layer): give_workspaces(layer) for layer in layers}
    cache = collect_fp8_weight_cache(layers, expected)
    assert len(cache) == sum(len(w) for w in expected.values())
    with torch.no_grad():
        for weights in expected.values():
            for w in weights:
                w.add_(1.0)
    cache.refresh(layers[1])
    for module in layers[1].modules():
        for name, workspace in module._fp8_workspaces.items():
            torch.testing.assert_close(workspace, (getattr(module, name).detach() * 4).round() / 4)
    untouched = next(iter(next(m for m in layers[0].modules() if m._fp8_workspaces)._fp8_workspaces.values()))
    assert not untouched.any(), "only the layer asked for is refreshed"


def test_collect_refuses_a_cache_that_misses_or_mismatches_weights() -> None:
    layer = decoder_layers(reference_model())[0]
    weights = give_workspaces(layer)
    module = next(m for m in layer.modules() if m._fp8_workspaces)
    name = next(iter(module._fp8_workspaces))
    dropped = module._fp8_workspaces.pop(name)
    with pytest.raises(RuntimeError, match="cached no FP8 copy"):
        collect_fp8_weight_cache([layer], {id(layer): weights})
    module._fp8_workspaces["no_such_weight"] = dropped
    with pytest.raises(RuntimeError, match="matches no weight"):
        collect_fp8_weight_cache([layer], {id(layer): weights})


def graphed_reference_model(calls_seen: list[dict]) -> tuple[nn.Module, GraphedLayers]:
    """A reference model on the fixed-shape path whose 'graphs' record the keyword arguments they get."""
    model = reference_model()
    shape, padded, calls = static_layer_calls(model, StaticShape(tokens=32, max_docs=4, max_seqlen=16))

    def recording(call):
        def run(tokens, cu_seqlens, **kwargs):
            calls_seen.append(kwargs)
            return call(tokens, cu_seqlens)
        return run

    graphs = GraphedLayers(shape, padded, {k: recording(c) for k, c in calls.items()}, "fp8")
    layers = list(decoder_layers(model))
    graphs.fp8_weight_cache = collect_fp8_weight_cache(layers, {id(layer): give_workspaces(layer) for layer in layers})
    install_graphs(model, graphs)
    return model, graphs


def test_optimizer_takes_over_the_casts_and_graphs_skip_theirs() -> None:
    seen: list[dict] = []
    model, graphs = graphed_reference_model(seen)
    assert graphs.weights_cast_in_forward
    ids = torch.randint(0, 50, (2, 16))
    model(input_ids=ids, labels=ids)
    assert seen and all(kw == {"is_first_microbatch": True} for kw in seen), "before: every replay casts"
    optimizer = LayerwiseAdamW(model, list(decoder_layers(model)), lr=1e-2)
    cast_fp8_weights_after_updates(model, optimizer)
    assert not graphs.weights_cast_in_forward
    seen.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(kw == {"is_first_microbatch": False} for kw in seen)
    for layer in decoder_layers(model):  # refreshed after the update: the workspaces hold the new weights
        for module in layer.modules():
            for name, workspace in module._fp8_workspaces.items():
                torch.testing.assert_close(workspace, (getattr(module, name).detach() * 4).round() / 4)


def test_casts_are_handed_only_to_an_optimizer_that_updates_every_layer() -> None:
    model, _ = graphed_reference_model([])
    with pytest.raises(ValueError, match="every trainable decoder layer"):
        cast_fp8_weights_after_updates(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="every trainable decoder layer"):
        cast_fp8_weights_after_updates(model, LayerwiseAdamW(model, list(decoder_layers(model))[:1]))
    plain = reference_model()
    with pytest.raises(ValueError, match="no CUDA graphs"):
        cast_fp8_weights_after_updates(plain, LayerwiseAdamW(plain, list(decoder_layers(plain))))


@pytest.mark.parametrize("layerwise", [False, True])
def test_graphs_cast_only_in_the_first_forward_after_an_optimizer_step(layerwise: bool) -> None:
    """track_weight_updates: micro-batches after the first one of a step reuse the FP8 copies;
    any optimizer.step() (AdamW or LayerwiseAdamW) makes the next forward cast again."""
    seen: list[dict] = []
    model, graphs = graphed_reference_model(seen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LayerwiseAdamW(model, [], lr=1e-2) if layerwise else torch.optim.AdamW(params, lr=1e-2)
    graphs.track_weight_updates(optimizer)
    ids = torch.randint(0, 50, (2, 16))
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
