"""FP8 weights cast once per update, by the optimizer, instead of in every forward.

Why: an FP8 step casts every BF16 weight to FP8 (and its transpose, for the backward's GEMMs)
at the start of each layer's forward: 10.4 ms of a 136 ms 7B step, on the critical path
(docs/SPEED_NOTES.md, change 8). The weights only change when the optimizer updates them, and
`LayerwiseAdamW` updates each layer during backward on a second stream; casting right there
moves the casts off the forward and under the backward's GEMMs. Measured: exact, but no
faster on a 7B (the backward grew by what the forward lost: the GPU is already busy there), so
`te-llama finetune` uses it only with `--fp8-weight-cache`.

How: the layers are captured as CUDA graphs with TE's quantized-weight cache
(`make_graphed_callables(cache_quantized_params=True)`): each TE module keeps its FP8 weights
in a persistent workspace, and a replay told `is_first_microbatch=False` reads it instead of
casting. After a layer's update, `FP8WeightCache.refresh(layer)` re-quantizes its weights into
those workspaces (same recipe, same scales as the forward would use; for delayed scaling the
weight's amax lands in the same history slot before the same scale update). Eager forwards
(evaluation, batches that do not fit the graphs) cast their own weights as usual.

TE keeps the workspaces in each module's `_fp8_workspaces` (TE 2.x); `collect_fp8_weight_cache`
checks it finds one per GEMM weight and raises otherwise (the capture then leaves the casts in the
forward, logged) rather than let training read weights nobody refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CachedWeight:
    weight: nn.Parameter
    """The BF16 weight the optimizer updates."""
    workspace: torch.Tensor
    """TE's quantized copy the graphed GEMMs read (a QuantizedTensor)."""
    quantizer: object
    """A copy of the workspace's quantizer with both usages (rows for forward, columns for dgrad)."""


class FP8WeightCache:
    """The FP8 copies of each graphed layer's weights, refreshed after the layer's update."""

    def __init__(self, per_layer: dict[int, list[CachedWeight]]) -> None:
        self._per_layer = per_layer  # id(layer) -> its cached weights

    def entries(self, layer: nn.Module) -> list[CachedWeight]:
        return list(self._per_layer[id(layer)])

    def __len__(self) -> int:
        return sum(len(cached) for cached in self._per_layer.values())

    @torch.no_grad()
    def refresh(self, layer: nn.Module) -> None:
        """Quantize the layer's current weights into the workspaces its graph reads (on the current stream)."""
        for cached in self._per_layer.get(id(layer), ()):  # layers kept in BF16 have none
            cached.quantizer.update_quantized(cached.weight.detach(), cached.workspace)


def _workspace_quantizer(workspace: torch.Tensor) -> object:
    quantizer = getattr(workspace, "_quantizer", None)
    if quantizer is None:
        raise RuntimeError("a cached FP8 weight has no quantizer (this Transformer Engine version keeps its "
                           "weight cache differently)")
    quantizer = quantizer.copy()
    # The refresh must keep both copies the graphs read (the forward's rows, the dgrad's columns);
    # TE drops whichever storage the quantizer's usage leaves out.
    quantizer.set_usage(rowwise=True, columnwise=True)
    return quantizer


def collect_fp8_weight_cache(layers: list[nn.Module], expected: dict[int, list[nn.Parameter]]) -> FP8WeightCache:
    """After capture with `cache_quantized_params=True`: each layer's (weight, FP8 workspace) pairs.

    expected: id(layer) -> the layer's GEMM weights (`cuda_graphs.gemm_weights`); every one must
    have a workspace, or training would read FP8 weights nobody refreshes.
    """
    per_layer: dict[int, list[CachedWeight]] = {}
    for layer in layers:
        cached = []
        for module in layer.modules():
            for name, workspace in getattr(module, "_fp8_workspaces", {}).items():
                weight = getattr(module, name, None)
                if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != tuple(workspace.shape):
                    raise RuntimeError(f"TE's FP8 weight cache entry {name!r} of {type(module).__name__} matches no "
                                       "weight of that shape")
                cached.append(CachedWeight(weight, workspace, _workspace_quantizer(workspace)))
        have = {id(c.weight) for c in cached}
        missing = [tuple(w.shape) for w in expected[id(layer)] if id(w) not in have]
        if missing:
            raise RuntimeError(f"TE cached no FP8 copy of the weights shaped {missing}")
        per_layer[id(layer)] = cached
    return FP8WeightCache(per_layer)
