"""CUDA graphs of the decoder layers for a fixed token budget (`te.make_graphed_callables`).

Why: at a few thousand tokens per step the GPU finishes TE's kernels faster than Python
launches them (docs/DESIGN.md). A CUDA graph per layer replays the layer's whole forward
(and its backward) with one launch each, FP8 quantization included.

What stays fixed: a graph replays the shapes it was captured with, so a graphed model takes
micro-batches of exactly `StaticShape.tokens` positions (packed rows padded to the budget,
as `collate_packed(pad_to=...)` makes them), at most `max_docs` documents of at most
`max_seqlen` tokens each. The document boundaries (`cu_seqlens`) stay an input: they are padded
to `max_docs + 1` entries with zero-length documents. Any other batch, and every forward
without gradients (eval, generate), runs the layers eagerly on the same weights. The
precision is the one given at capture.

Gradients: in one process with fused Q/K/V (the default), TE's GEMMs write each weight's gradient
straight into a persistent buffer that is bound as its `.grad` at every training forward
(`write_wgrads_in_place`), so the graphs keep no second copy of the gradients. Under DDP they
hand every gradient to autograd, whose accumulation hooks DDP's reducer listens to.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..availability import te_import_error
from ..errors import BackendUnavailableError
from ..model.convert import CONVERSION_ATTR, decoder_layers
from ..model.token_layout import TokenLayout
from ..precision import FP8_PRECISIONS, check_precision_available, make_recipe
from .gpu_memory import available_bytes, optimizer_state_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticShape:
    """The micro-batch a graph is captured for."""

    tokens: int
    """Positions per micro-batch (b * s), padding documents included."""
    max_docs: int
    """Most documents in one micro-batch, padding documents included."""
    max_seqlen: int
    """Longest document."""


def padded_cu_seqlens(cu_seqlens: torch.Tensor, max_docs: int) -> torch.Tensor:
    """`cu_seqlens` with zero-length documents appended up to `max_docs + 1` entries (no host sync)."""
    missing = max_docs + 1 - cu_seqlens.numel()
    if missing < 0:
        raise ValueError(f"{cu_seqlens.numel() - 1} documents; the graph was captured for at most {max_docs}")
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(missing)]) if missing else cu_seqlens


def even_cu_seqlens(tokens: int, max_seqlen: int, max_docs: int, device: torch.device) -> torch.Tensor:
    """A valid layout for capture: documents of max_seqlen tokens (the last one shorter), padded."""
    bounds = list(range(0, tokens, max_seqlen)) + [tokens]
    if len(bounds) - 1 > max_docs:
        raise ValueError(f"{tokens} tokens in documents of at most {max_seqlen} need more than "
                         f"max_docs={max_docs} documents")
    return padded_cu_seqlens(torch.tensor(bounds, dtype=torch.int32, device=device), max_docs)


class PackedLayerCall(nn.Module):
    """One decoder layer's packed (THD) forward with the non-tensor arguments fixed: what is graphed."""

    def __init__(self, layer: nn.Module, angles: torch.Tensor, max_seqlen: int) -> None:
        super().__init__()
        self.layer = layer
        self.angles = angles  # (max_seqlen, 1, 1, d); a plain attribute: the graph reads its memory
        self.max_seqlen = max_seqlen

    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.layer.forward_packed(tokens, cu_seqlens, self.max_seqlen, self.angles)


class GraphedLayers:
    """The graphed callables of one model's layers, and which batches may replay them."""

    def __init__(self, shape: StaticShape, padded_tokens: int, calls: dict[int, Callable],
                 precision: str, grad_buffers: dict[int, list[nn.Parameter]] | None = None,
                 accumulate_grads: bool = True) -> None:
        self.shape = shape
        self.padded_tokens = padded_tokens
        """Rows of the packed tensor the layers see (tokens rounded up to TE's multiple)."""
        self.precision = precision
        self._calls = calls  # id(layer) -> graphed PackedLayerCall
        self.grad_buffers = grad_buffers or {}
        """id(layer) -> the weights whose gradient GEMM writes `main_grad` (empty: split Q/K/V)."""
        self.accumulate_grads = accumulate_grads
        self.fp8 = precision in FP8_PRECISIONS
        """FP8 graphs read persistent FP8 weight copies, cast into by the first replay after an update."""
        self._weights_changed = True
        self._tracked_optimizer = False
        self._last_layer = next(reversed(calls), None)
        self._cu_cache: tuple[TokenLayout, torch.Tensor] | None = None
        self.eager_batches = 0
        """Training forwards that did not fit the captured shape and ran eagerly (first one logged)."""

    def __call__(self, layer: nn.Module, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        """The model's packed runner (ModelContext.packed_runner): replay the layer's graph, or None
        (run eagerly) when this micro-batch does not have the captured shape."""
        self.bind_grads(layer)
        if self.accepts(layout):
            return self.run(layer, tokens, layout)
        self.note_eager(layout)
        return None

    def accepts(self, layout: TokenLayout) -> bool:
        """True when this micro-batch has the captured shape (checked on the host, no sync)."""
        return (layout.keep is None and layout.num_real + layout.pad_rows == self.padded_tokens
                and layout.max_seqlen <= self.shape.max_seqlen
                and layout.cu_seqlens.numel() <= self.shape.max_docs + 1)

    def note_eager(self, layout: TokenLayout) -> None:
        if self.eager_batches == 0:
            logger.warning("a training batch of %d tokens, %d documents, longest %d does not fit the CUDA graphs "
                           "(%s): it runs eagerly", layout.num_real, layout.cu_seqlens.numel() - 1,
                           layout.max_seqlen, self.shape)
        self.eager_batches += 1

    def bind_grads(self, layer: nn.Module) -> None:
        """Before a training forward: make `.grad` the buffer TE's weight-gradient GEMMs write into.

        After `zero_grad(set_to_none=True)` the buffer is bound again (and zeroed first when
        gradients accumulate); in-place zeroing keeps it bound. Without accumulation every
        backward overwrites the gradients of the previous one.
        """
        for weight in self.grad_buffers.get(id(layer), ()):
            if weight.grad is None:
                if self.accumulate_grads:
                    weight.main_grad.zero_()
                weight.grad = weight.main_grad
            elif weight.grad is not weight.main_grad:
                raise RuntimeError("a graphed layer's .grad was replaced by another tensor; TE writes its weight "
                                   "gradients into `main_grad`: zero gradients with zero_grad() instead")

    def reset(self) -> None:
        """Free the captured graphs (TE's per-callable `reset`)."""
        for call in self._calls.values():
            reset = getattr(call, "reset", None)
            if callable(reset):
                reset()

    def run(self, layer: nn.Module, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        cached = self._cu_cache
        if cached is None or cached[0] is not layout:  # once per model forward, shared by the layers
            cached = self._cu_cache = (layout, padded_cu_seqlens(layout.cu_seqlens, self.shape.max_docs))
        if not self.fp8:
            return self._calls[id(layer)](tokens, cached[1])
        # The first FP8 module of each autocast region sets TE's global skip-the-cast flag from this
        # (every replay says it, so graphs of another model cannot leave it set for ours).
        out = self._calls[id(layer)](tokens, cached[1], is_first_microbatch=self._weights_changed)
        if self._tracked_optimizer and id(layer) == self._last_layer:
            self._weights_changed = False
        return out

    def track_weight_updates(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Cast the FP8 weights only in the first forward after each `optimizer.step()` (gradient
        accumulation: one cast per step, not per micro-batch). Only when nothing else changes the
        weights between steps. None: the layers' GEMM weights are frozen (LoRA; the adapters are
        plain torch parameters the graphs read in place): cast once, in the first forward."""
        if optimizer is not None:
            optimizer.register_step_post_hook(self._note_update)
        self._tracked_optimizer = True

    def _note_update(self, *_: object) -> None:
        self._weights_changed = True


def graphs_unsupported_reason(model: nn.Module) -> str | None:
    """Why this model's layers cannot be graphed, or None."""
    conversion = getattr(model, CONVERSION_ATTR, None)
    if conversion is None or conversion.backend != "te":
        return "CUDA graphs need te-llama's TE layers (backend='te')"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA GPU"
    if conversion.spec.rope_type == "dynamic":
        return "dynamic RoPE changes with the sequence length, which a graph cannot"
    if getattr(model, "is_gradient_checkpointing", False) or any(
            getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(model)):
        return "activation checkpointing recomputes layers outside the graph"
    return None


def accumulation_unsupported_reason() -> str | None:
    """Why graphed layers cannot accumulate gradients over micro-batches with this Transformer Engine, or None.

    Every gradient a graph hands autograd (norm weights and biases always, every weight under DDP)
    comes from the graph's static buffers. Transformer Engine before 2.19 returned those buffers
    themselves, which autograd may keep as `.grad`: the next micro-batch's replay then overwrites the
    gradient accumulation is adding to. 2.19 returns copies (`clone_param_grads_on_return`).
    """
    if te_import_error():
        return None  # no TE: graphs are ruled out by graphs_unsupported_reason
    import transformer_engine
    import transformer_engine.pytorch as te

    if "clone_param_grads_on_return" in inspect.signature(te.make_graphed_callables).parameters:
        return None
    return (f"Transformer Engine {transformer_engine.__version__} hands a CUDA graph's gradients to autograd in the "
            "graph's own buffers, which the next micro-batch overwrites: use --grad-accum 1, or upgrade to "
            "Transformer Engine 2.19 or newer")


def static_layer_calls(model: nn.Module, shape: StaticShape) -> tuple[StaticShape, int, dict[int, PackedLayerCall]]:
    """Each decoder layer's fixed-shape packed call, before capture: (shape as the layers see
    it, padded token rows, id(layer) -> call). Eager calls of these are what the graphs replay."""
    layers = list(decoder_layers(model))
    context = layers[0].context
    device = next(layers[0].parameters()).device
    padded_tokens = shape.tokens + (-shape.tokens % context.layouts.pad_multiple)
    max_docs = shape.max_docs + (1 if padded_tokens > shape.tokens else 0)  # the layout's pad document
    shape = StaticShape(shape.tokens, max_docs, min(shape.max_seqlen, shape.tokens))
    angles = context.rope.table(shape.max_seqlen, device).clone()
    return shape, padded_tokens, {id(layer): PackedLayerCall(layer, angles, shape.max_seqlen) for layer in layers}


def gemm_weights(layer: nn.Module) -> list[nn.Parameter] | None:
    """The trained weights of a TE layer's GEMMs (one parameter per GEMM), or None when one is split
    into several parameters (separate Q/K/V), which TE cannot accumulate into one buffer. Frozen
    ones (a LoRA layer's base) have no gradient to write: none of them is listed."""
    import transformer_engine.pytorch as te

    weights = []
    for module in layer.modules():
        if isinstance(module, te.LayerNormMLP):
            weights += [module.fc1_weight, module.fc2_weight]
        elif isinstance(module, (te.Linear, te.LayerNormLinear)):
            if len(module.weight_names) != 1:
                return None
            weights.append(getattr(module, module.weight_names[0]))
    return [weight for weight in weights if weight.requires_grad]


def shared_buffer_sets(weights: list[list[nn.Parameter]], count: int) -> list[list[torch.Tensor]]:
    """`count` sets of gradient buffers shaped like one layer's GEMM weights (all layers alike)."""
    first = [tuple(w.shape) for w in weights[0]]
    for index, layer_weights in enumerate(weights):
        if [tuple(w.shape) for w in layer_weights] != first:
            raise ValueError(f"shared gradient buffers need equal layers; layer {index} has weight shapes "
                             f"{[tuple(w.shape) for w in layer_weights]}, layer 0 {first}")
    return [[torch.zeros_like(w) for w in weights[0]] for _ in range(count)]


def write_wgrads_in_place(layers: list[nn.Module], accumulate: bool,
                          shared_buffers: int = 0) -> dict[int, list[nn.Parameter]]:
    """Have TE's weight-gradient GEMMs write into one persistent buffer per weight (TE's
    `fuse_wgrad_accumulation` with `main_grad`), which becomes the weight's `.grad`.

    Why: a graph otherwise returns weight gradients from static buffers that are copied into
    `.grad` after every replay: a second copy of every gradient kept for the graph's lifetime
    and a copy pass per step. With `overwrite_main_grad` (no accumulation) the GEMM writes the
    gradient without reading the buffer first. Empty when the layers cannot (split Q/K/V).

    shared_buffers=N > 0: layer i writes buffer set i % N, so the gradients take N layers'
    worth of memory instead of all of them (0.8 instead of 12.6 GiB for a 7B, N=2). Only for an
    optimizer that consumes each layer's gradients before the layer N below overwrites them
    (`LayerwiseAdamW(reused_grad_buffers=N)`); after backward `.grad` holds no full gradient.
    """
    per_layer = {id(layer): gemm_weights(layer) for layer in layers}
    if any(weights is None for weights in per_layer.values()):
        if shared_buffers:
            raise ValueError("shared gradient buffers need fused Q/K/V (one weight per GEMM)")
        return {}
    if shared_buffers and accumulate:
        raise ValueError("gradient buffers shared between layers cannot accumulate micro-batches")
    sets = shared_buffer_sets([per_layer[id(layer)] for layer in layers], shared_buffers) if shared_buffers else None
    for index, layer in enumerate(layers):
        owned = {id(w) for w in per_layer[id(layer)]}
        for module in layer.modules():  # the public constructor switch, set after construction
            if hasattr(module, "fuse_wgrad_accumulation") and any(
                    id(w) in owned for w in module.parameters(recurse=False)):
                module.fuse_wgrad_accumulation = True
        for slot, weight in enumerate(per_layer[id(layer)]):
            weight.main_grad = sets[index % shared_buffers][slot] if sets else torch.zeros_like(weight)
            weight.overwrite_main_grad = not accumulate
    return per_layer


def install_graphs(model: nn.Module, graphs: GraphedLayers | None) -> None:
    """Route the model's training forwards through `graphs` (None: back to eager)."""
    decoder_layers(model)[0].context.packed_runner = graphs


def installed_graphs(model: nn.Module) -> GraphedLayers | None:
    runner = decoder_layers(model)[0].context.packed_runner
    return runner if isinstance(runner, GraphedLayers) else None


def capture_cuda_graphs(model: nn.Module, shape: StaticShape, precision: str, accumulate_grads: bool = True,
                        warmup_iters: int = 3, shared_grad_buffers: int = 0,
                        wgrads_in_place: bool = True) -> GraphedLayers:
    """Capture every decoder layer of a converted TE model for micro-batches of `shape`.

    Call after the weights are final in memory (loaded, resumed) and before training; the
    graphs read the parameters in place, so optimizer steps are seen by every replay.
    accumulate_grads=False (one backward per optimizer step) lets each backward overwrite the
    layers' weight gradients instead of adding to them: no zeroing, one memory pass less.
    shared_grad_buffers=N: the layers' weight gradients share N buffer sets (`write_wgrads_in_place`),
    for `LayerwiseAdamW(reused_grad_buffers=N)` only.
    wgrads_in_place=False: every gradient goes back through autograd, as DDP needs (its reducer
    hears of a gradient only from the parameter's accumulation hook, which in-place writes skip).
    FP8: the graphs read FP8 weight copies kept between replays (TE's `cache_quantized_params`);
    every replay casts into them unless told the weights did not change (`track_weight_updates`).
    """
    reason = graphs_unsupported_reason(model)
    if reason:
        raise BackendUnavailableError(f"cannot capture CUDA graphs: {reason}")
    check_precision_available(precision)
    fp8 = precision in FP8_PRECISIONS
    import transformer_engine.pytorch as te

    shape, padded_tokens, calls = static_layer_calls(model, shape)
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    sample_cu = even_cu_seqlens(padded_tokens, shape.max_seqlen, shape.max_docs, device)
    generator = torch.Generator(device=device).manual_seed(0)
    sample_args = tuple(
        (torch.randn(padded_tokens, model.config.hidden_size, device=device, dtype=dtype,
                     generator=generator).requires_grad_(), sample_cu) for _ in calls)
    layers = list(decoder_layers(model))
    grad_buffers = write_wgrads_in_place(layers, accumulate_grads, shared_grad_buffers) if wgrads_in_place else {}
    # The layers see the dtype they will see in training: BF16 under autocast (no cast cache
    # inside a graph), or the weights' own dtype for fp32.
    cast = contextlib.nullcontext() if precision == "fp32" else \
        torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    with cast:
        # Warm-up runs eagerly; its freed blocks stay cached outside the graphs' private pool
        # unless released before capture (at 4 x 1024 tokens that alone ran a 7B out of memory).
        graphed = te.make_graphed_callables(
            tuple(calls.values()), sample_args, num_warmup_iters=warmup_iters,
            enabled=fp8,
            recipe=make_recipe(precision) if fp8 else None, post_warmup_hook=torch.cuda.empty_cache,
            cache_quantized_params=fp8)
    torch.cuda.synchronize(device)
    graphs = GraphedLayers(shape, padded_tokens, dict(zip(calls, graphed)), precision, grad_buffers, accumulate_grads)
    install_graphs(model, graphs)
    logger.info("captured CUDA graphs of %d layers for %s (%s)", len(calls), shape, precision)
    return graphs


def release_cuda_graphs(model: nn.Module) -> None:
    """Drop the graphs and their memory; the layers run eagerly again, gradients through autograd.

    Also undoes a capture that failed halfway (out of memory): the in-place gradient switches
    are turned off wherever they were set.
    """
    graphs = installed_graphs(model)
    if graphs is not None:
        graphs.reset()
    install_graphs(model, None)
    layers = list(decoder_layers(model))
    for layer in layers:
        for module in layer.modules():
            if getattr(module, "fuse_wgrad_accumulation", False):
                module.fuse_wgrad_accumulation = False
            workspaces = getattr(module, "_fp8_workspaces", None)
            if workspaces:  # TE's cached FP8 weights: their memory goes too
                workspaces.clear()
        for weight in layer.parameters():
            if hasattr(weight, "main_grad"):
                if weight.grad is weight.main_grad:
                    weight.grad = None
                del weight.main_grad, weight.overwrite_main_grad
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def graphs_leave_room(model: nn.Module, device: torch.device, headroom_bytes: int, cap: int | None = None,
                      grads_allocated: bool = False) -> tuple[bool, str]:
    """After capture: is there still room for what training allocates later (AdamW's two
    moments, the gradients not written in place, `headroom_bytes` for logits and the rest)?
    grads_allocated: every gradient already has its memory (DDP's buckets, made before capture).

    A graph keeps its activation memory reserved for good, so it can fit at capture and
    still run the first optimizer step out of memory; this checks before that happens.
    """
    graphs = installed_graphs(model)
    in_place = {id(w) for weights in graphs.grad_buffers.values() for w in weights} if graphs else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    moments = optimizer_state_bytes(model)
    other_grads = 0 if grads_allocated else \
        sum(p.numel() * p.element_size() for p in trainable if id(p) not in in_place)
    need = moments + other_grads + headroom_bytes
    have = available_bytes(device, cap)
    return have >= need, f"{have / 2**30:.1f} GiB free after capture, {need / 2**30:.1f} GiB needed later"
