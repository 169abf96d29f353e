"""AdamW that updates each decoder layer as soon as backward is done with it, on a second CUDA stream.

Why: with the layers as CUDA graphs, AdamW is a quarter of an FP8 step on a 7B model
(~42 of ~162 ms, docs/DESIGN.md) and runs after backward, when the tensor cores idle.
The update is memory-bound and the backward's GEMMs are compute-bound, so starting layer i's
update while layer i-1's backward runs lets the two share the GPU.

What it needs: a layer's gradients must be final when its backward ends. So one backward per
optimizer step (no gradient accumulation), no clipping by the global gradient norm (which
needs every gradient first) and no gradient all-reduce (one process). A second backward before
`step()` raises. Activation checkpointing is fine: transformers keeps module hooks outside the
recompute, and a recompute that runs them again sees the input it already hooked and adds no
second hook. The embeddings, the final norm and the lm_head are updated in `step()`.

Where the gradients are final only after backward (clipping, gradient accumulation, DDP), the
updates still leave the critical path on CUDA: `step()` queues them on the second stream, the rest
(embeddings, final norm, lm_head) first, then layer by layer in forward order, and the next forward
of each layer waits for its own update only. The memory-bound update then shares the GPU with the
next forward's GEMMs. Anything else that reads the weights or the optimizer state between steps
calls `join()` first (checkpoints, export).

It is a `torch.optim.AdamW` with one parameter group per decoder layer (and one for the rest):
`state_dict`, learning-rate schedulers and `zero_grad` behave as usual, and on CPU the layer
updates simply run inline.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..availability import triton_available
from . import triton_adamw

GRAD_BUFFER_SETS = 2
"""Weight-gradient buffer sets graphed layers share under LayerwiseAdamW: two lets one layer's
backward run while the update of the layer above still reads its gradients."""


def param_groups_by_layer(model: nn.Module, layers: Sequence[nn.Module]) -> list[dict]:
    """One parameter group per decoder layer with trainable parameters, then one for the rest: the layout of
    every optimizer of te-llama's own layers outside FSDP2, so its state loads whichever way a resumed run
    updates (during backward or after it)."""
    layer_groups = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
    in_layers = {id(p) for params in layer_groups for p in params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_layers]
    return [{"params": params} for params in layer_groups if params] + ([{"params": rest}] if rest else [])


class LayerwiseAdamW(torch.optim.AdamW):
    """AdamW whose per-layer updates start from backward hooks; `step()` does the rest and joins."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], reused_grad_buffers: int = 0,
                 kernel: str = "torch", in_backward: bool = True, defer_to_next_forward: bool = True,
                 **adamw_kwargs: Any) -> None:
        """reused_grad_buffers=N: layer i's weight gradients live in buffer set i % N
        (`capture_cuda_graphs(shared_grad_buffers=N)`); the backward of each layer then waits
        for the update of the layer N above it, the buffer's previous user. in_backward=False: every
        update starts in `step()`; on CUDA each layer's is awaited by its next forward
        (defer_to_next_forward=False: by the end of `step()`)."""
        layer_groups = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
        groups = param_groups_by_layer(model, layers)
        if not groups:
            raise ValueError("LayerwiseAdamW: the model has no trainable parameters")
        if kernel not in ("torch", "triton"):
            raise ValueError(f"kernel={kernel!r} is unknown; choose 'torch' or 'triton'")
        if kernel == "triton":
            if adamw_kwargs.get("amsgrad") or adamw_kwargs.get("maximize"):
                raise ValueError("kernel='triton' implements plain AdamW (no amsgrad, no maximize); use kernel='torch'")
            if not triton_available(groups[0]["params"][0].device):
                raise ValueError("kernel='triton' needs a CUDA GPU and Triton; use kernel='torch'")
            adamw_kwargs = adamw_kwargs | {"fused": False, "foreach": False}  # state kept as non-fused AdamW's
        self._kernel = kernel
        if reused_grad_buffers and any(not params for params in layer_groups):
            raise ValueError("reused gradient buffers need every decoder layer trainable (one group per layer)")
        super().__init__(groups, **adamw_kwargs)
        self._reused_grad_buffers = reused_grad_buffers
        self._updated: dict[int, torch.cuda.Event] = {}  # group -> event after its update (this backward)
        device = next(p.device for group in groups for p in group["params"])
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._stepped: set[int] = set()  # groups updated since the last step()
        self._hooks = []
        self._watched: dict[int, weakref.ref] = {}
        """Group i -> the layer input its backward hook sits on (this step's forward)."""
        grouped = [layer for layer, params in zip(layers, layer_groups) if params]  # group i's layer
        self._layer_count = len(grouped)
        self._layers = grouped if in_backward else []
        """Group i's layer, for the groups updated from backward hooks."""
        for index, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_pre_hook(
                functools.partial(self._watch_layer_input, index), with_kwargs=True))
        self._deferred = not in_backward and defer_to_next_forward and self._side_stream is not None
        self._pending: dict[int, tuple[torch.cuda.Event, list[torch.Tensor]]] = {}
        """Group i -> the event after its update, queued by `step()`, and the gradients it reads: awaited by
        layer i's next forward, which then lets the gradients go (zero_grad dropped them on the main stream;
        held here, their memory is not reused before the update has read them)."""
        if self._deferred:
            for index, layer in enumerate(grouped):
                self._hooks.append(layer.register_forward_pre_hook(functools.partial(self._await_update, index)))

    def _watch_layer_input(self, group_index: int, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """On a training forward: hook the layer's input, whose gradient is the last thing its backward makes."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_grad_enabled() and layer.training and torch.is_tensor(hidden) and hidden.requires_grad:
            watched = self._watched.get(group_index)
            if watched is not None and watched() is hidden:  # activation checkpointing recomputes the layer
                return
            self._watched[group_index] = weakref.ref(hidden)
            hidden.register_hook(functools.partial(self._layer_backward_done, group_index))

    def _layer_backward_done(self, group_index: int, grad: torch.Tensor) -> None:
        # Runs before autograd moves on to the layer below; the layer's own weight gradients
        # have been accumulated by then (autograd runs AccumulateGrad nodes first).
        if group_index in self._stepped:
            raise RuntimeError("LayerwiseAdamW updates each layer during backward, so it takes exactly one backward "
                               "per optimizer step: call step() after each backward (no gradient accumulation)")
        self._stepped.add(group_index)
        if self._side_stream is None:
            self._update([self.param_groups[group_index]])
            return
        main = torch.cuda.current_stream()
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            self._update([self.param_groups[group_index]])
            self._updated[group_index] = torch.cuda.Event()  # its gradients are consumed
            self._updated[group_index].record()
        if self._reused_grad_buffers:  # the layer below writes the buffer the layer N above it used
            previous_user = self._updated.get(group_index - 1 + self._reused_grad_buffers)
            if previous_user is not None:
                main.wait_event(previous_user)

    def _update(self, groups: list[dict]) -> None:
        """AdamW's own step on some of the groups (it walks `self.param_groups`), or the Triton kernel's."""
        if self._kernel == "triton":
            self._triton_update(groups)
            return
        everything = self.param_groups
        self.param_groups = groups
        try:
            super().step()
        finally:
            self.param_groups = everything

    @torch.no_grad()
    def _triton_update(self, groups: list[dict]) -> None:
        """Per tensor, with the state laid out as torch's non-fused AdamW keeps it (step on the host)."""
        for group in groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                triton_adamw.adamw_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"],
                                          int(state["step"]), float(group["lr"]), group["betas"], group["eps"],
                                          group["weight_decay"])

    def _await_update(self, group_index: int, layer: nn.Module, args: tuple) -> None:
        pending = self._pending.pop(group_index, None)
        if pending is not None:
            torch.cuda.current_stream().wait_event(pending[0])

    def join(self) -> None:
        """Make the current stream wait for every queued update (before reading weights or optimizer state
        outside a forward: checkpoints, export)."""
        if self._side_stream is not None:
            torch.cuda.current_stream().wait_stream(self._side_stream)
        self._pending.clear()

    def state_dict(self) -> dict[str, Any]:
        self.join()
        return super().state_dict()

    def _queue_updates(self) -> None:
        """Every update on the side stream once the gradients are final, the rest first (awaited here:
        the forward starts with the embeddings and the loss reads the lm_head), then each layer in
        forward order, awaited by that layer's next forward."""
        main, side = torch.cuda.current_stream(), self._side_stream
        self.join()  # a layer whose forward did not run since the last step
        side.wait_stream(main)  # backward, clipping and DDP's all-reduce are done
        with torch.cuda.stream(side):
            if len(self.param_groups) > self._layer_count:
                self._update(self.param_groups[self._layer_count:])
            rest_done = torch.cuda.Event()
            rest_done.record()
            for index in range(self._layer_count):
                group = self.param_groups[index]
                self._update([group])
                done = torch.cuda.Event()
                done.record()
                self._pending[index] = (done, [p.grad for p in group["params"] if p.grad is not None])
        main.wait_event(rest_done)

    def step(self, closure: None = None) -> None:
        """Update what backward did not (embeddings, final norm, lm_head), then wait for the layer updates
        (or, with no updates in backward, queue them for the next forward)."""
        if closure is not None:
            raise ValueError("LayerwiseAdamW.step takes no closure (its updates start inside backward)")
        if self._deferred:
            self._queue_updates()
            return
        pending_layers = [i for i in range(len(self._layers)) if i not in self._stepped]
        if pending_layers:  # layers whose backward hook did not fire (e.g. the input needed no gradient)
            self._update([self.param_groups[i] for i in pending_layers])
        rest = [g for i, g in enumerate(self.param_groups) if i >= len(self._layers)]
        if rest:
            self._update(rest)
        if self._side_stream is not None:
            torch.cuda.current_stream().wait_stream(self._side_stream)
        self._stepped.clear()
        self._updated.clear()
        self._watched.clear()
