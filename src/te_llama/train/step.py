"""The one training step: what `te-llama finetune` runs in its loop and `te-llama bench` times.

`build_train_step(config, runtime, model, accelerator, ...)` decides the speed features from
the configuration (each `auto` feature on wherever it is valid and exact, an explicit one that
cannot run refused with the fix), builds AdamW and the schedule, and returns a `TrainStep`:
forward under the run's precision, backward, clipping, AdamW, schedule, zero_grad, over the
micro-batches of one optimizer step. CUDA graphs are captured on the first call, after a resumed
run has loaded its weights.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from ..availability import triton_available
from ..model.convert import decoder_layers, release_weight_transposes
from ..precision import FP8_PRECISIONS, autocast
from .batching import Batch
from .config import ConfigError, FinetuneConfig
from .cuda_graphs import (
    StaticShape,
    accumulation_unsupported_reason,
    capture_cuda_graphs,
    graphs_leave_room,
    graphs_unsupported_reason,
    installed_graphs,
    release_cuda_graphs,
)
from .faults import out_of_memory
from .layerwise_adamw import GRAD_BUFFER_SETS, LayerwiseAdamW, param_groups_by_layer
from .loss import LossModel, chunk_tokens
from .parallel import shard_fsdp2

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Choices resolved from 'auto' for this machine."""

    device: torch.device
    backend: str
    precision: str
    param_dtype: torch.dtype
    memory_cap: int | None = None
    """Bytes of GPU memory the run may use (--max-memory), None: the whole GPU."""


@dataclass(frozen=True)
class Features:
    """The speed features a run uses, decided once at start (`resolve_features`)."""

    cuda_graphs: bool
    overlap_optimizer: bool
    fused_loss: bool
    optimizer_kernel: str
    """"triton" (te_llama.train.triton_adamw) on CUDA without FSDP2, else "torch" (fused AdamW on CUDA)."""


def _graphs_blocker(config: FinetuneConfig, runtime: Runtime, model: Any) -> str | None:
    if runtime.backend != "te":
        return f"backend {runtime.backend!r} (graphs are for TE layers): use --backend te"
    if config.activation_checkpointing:
        return "activation checkpointing recomputes layers outside the graph: drop --activation-checkpointing"
    if not config.packing:
        return "padding gives every batch another shape: use --packing"
    if config.grad_accum > 1 and (reason := accumulation_unsupported_reason()):
        return reason
    if config.parallel == "fsdp2":
        return ("FSDP2 all-gathers each layer's weights into fresh memory from hooks around the layer's call and "
                "frees them after; a graph replays fixed addresses and runs no hooks: run one process")
    return graphs_unsupported_reason(model) if model is not None else None


def _overlap_blocker(config: FinetuneConfig, runtime: Runtime, world: int) -> str | None:
    if runtime.backend == "hf":
        return "backend 'hf' is the baseline as transformers runs it (torch's AdamW after backward)"
    if config.grad_accum > 1:
        return "gradients are final only after the last micro-batch: use --grad-accum 1"
    if config.max_grad_norm > 0:
        return "clipping by the global norm needs every gradient before any update: use --max-grad-norm 0"
    if world > 1 or config.parallel == "fsdp2":
        return ("DDP and FSDP2 reduce gradients across processes asynchronously, in buckets, and hand the reduced "
                "values back only at the end of backward; a layer updated during backward would use its own "
                "process's gradient: run one process")
    return None


def _fused_loss_blocker(runtime: Runtime) -> str | None:
    if runtime.backend == "hf":
        return "backend 'hf' is the baseline as transformers runs it"
    return None


def _decide(name: str, asked: bool | None, blocker: str | None, log: bool) -> bool:
    """Explicit on: honoured or refused with the fix. Unset: on wherever it runs (why not: logged once)."""
    if asked and blocker:
        raise ConfigError(f"--{name.replace('_', '-')} cannot run here: {blocker}")
    if asked is None and blocker and log:
        logger.info("%s off: %s", name.replace("_", " "), blocker.rsplit(":", 1)[0])
    return bool(asked if asked is not None else blocker is None)


def resolve_features(config: FinetuneConfig, runtime: Runtime, model: Any, world: int, log: bool = True) -> Features:
    """The speed features of this run. `model=None` checks what the configuration alone decides
    (the recipe does that before loading anything; the model can still rule CUDA graphs out)."""
    # te-llama's Triton AdamW where it runs; backend 'hf' stays transformers + torch's fused AdamW
    ours = runtime.backend != "hf" and config.parallel != "fsdp2"
    kernel = "triton" if ours and triton_available(runtime.device) else "torch"
    graphs = _graphs_blocker(config, runtime, model)
    return Features(cuda_graphs=_decide("cuda_graphs", config.cuda_graphs, graphs, log),
                    overlap_optimizer=_decide("overlap_optimizer", config.overlap_optimizer,
                                              _overlap_blocker(config, runtime, world), log),
                    fused_loss=_decide("fused_loss", config.fused_loss, _fused_loss_blocker(runtime), log),
                    optimizer_kernel=kernel)


def make_optimizer(config: FinetuneConfig, runtime: Runtime, model: Any, features: Features) -> torch.optim.Optimizer:
    """AdamW: per decoder layer during backward (overlap), or after backward; Triton's update kernel
    where it runs."""
    # one group per layer where LayerwiseAdamW may run (backends te and reference, one process or DDP), so
    # the state loads whichever way a resumed run updates; one group for transformers' baseline and FSDP2
    layered = runtime.backend != "hf" and config.parallel != "fsdp2"
    groups = param_groups_by_layer(model, decoder_layers(model)) if layered else \
        [{"params": [p for p in model.parameters() if p.requires_grad]}]
    adamw = {"lr": config.learning_rate, "weight_decay": config.weight_decay, "fused": runtime.device.type == "cuda"}
    overlap = ", each layer updated during backward" if features.overlap_optimizer else \
        ", each layer's update overlapping its next forward" if features.optimizer_kernel == "triton" else ""
    logger.info("optimizer: AdamW, %s kernel%s", features.optimizer_kernel, overlap)
    if not features.overlap_optimizer and features.optimizer_kernel == "torch":
        return torch.optim.AdamW(groups, **adamw)
    return LayerwiseAdamW(model, decoder_layers(model), reused_grad_buffers=shared_grad_buffers(config, features),
                          kernel=features.optimizer_kernel, in_backward=features.overlap_optimizer, **adamw)


def shared_grad_buffers(config: FinetuneConfig, features: Features) -> int:
    """Gradient buffer sets graphed layers share: with the overlapped optimizer, each layer's update
    consumes its gradients during backward, so two sets serve every layer (fused Q/K/V layout). None
    with LoRA: the layers' GEMM weights are frozen, and the adapters' gradients are small."""
    return GRAD_BUFFER_SETS if features.overlap_optimizer and features.cuda_graphs and config.fuse_qkv and \
        not config.lora else 0


class TrainStep:
    """One optimizer step over a list of micro-batches; returns (mean loss, grad norm or None)."""

    def __init__(self, config: FinetuneConfig, runtime: Runtime, features: Features, model: Any, raw_model: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, accelerator: Accelerator,
                 graph_shape: StaticShape | None, clip: Callable[[], Any] | None) -> None:
        self.config, self.runtime, self.features = config, runtime, features
        self.model, self.raw_model = model, raw_model
        """`model`: what the step calls, as prepared (the fused loss's `LossModel` around the HF model or the HF
        model, DDP-wrapped with several processes, FSDP2's root under FSDP2); `raw_model`: the HF model itself,
        whose state dict checkpoints and exports hold."""
        self.optimizer, self.scheduler, self.accelerator = optimizer, scheduler, accelerator
        self.graph_shape = graph_shape
        """The micro-batch shape the layers are captured for (None: eager); rows are padded to it."""
        self._clip = clip

    def loss(self, inputs: dict) -> torch.Tensor:
        """The micro-batch's mean loss through `model` (training and eval alike)."""
        out = self.model(**inputs)
        return out if self.features.fused_loss else out.loss

    def capture_graphs(self) -> None:
        """Capture the decoder layers for `graph_shape`: call once, before the first step and after a
        resumed run loaded its weights. Unset (auto) graphs that do not fit give way to eager layers
        (`graph_shape` becomes None: rows need no padding); asked-for ones raise."""
        if self.graph_shape is None:
            return
        try:
            capture_cuda_graphs(self.raw_model, self.graph_shape, self.runtime.precision,
                                accumulate_grads=self.config.grad_accum > 1,
                                shared_grad_buffers=shared_grad_buffers(self.config, self.features),
                                wgrads_in_place=self.accelerator.num_processes == 1)
        except torch.OutOfMemoryError:
            release_cuda_graphs(self.raw_model)
            if self.config.cuda_graphs:
                raise out_of_memory(self.runtime.device, self.graph_shape.tokens,
                                    memory_fixes(self.config, self.runtime, graphed=True),
                                    "while capturing the CUDA graphs") from None
            logger.warning("CUDA graphs off: capturing them ran out of GPU memory; running eagerly")
            self.graph_shape = None
            return
        fits, detail = graphs_leave_room(self.raw_model, self.runtime.device, self.loss_bytes() + 2 * 2**30,
                                         self.runtime.memory_cap, grads_allocated=self.accelerator.num_processes > 1)
        if not fits:
            release_cuda_graphs(self.raw_model)
            message = (f"CUDA graphs keep their activation memory reserved and would leave too little for the "
                       f"optimizer ({detail}); lower --batch-size or --max-seq-len")
            if self.config.cuda_graphs:
                raise ConfigError(f"--cuda-graphs: {message}")
            logger.warning("CUDA graphs off: %s; running eagerly", message)
            self.graph_shape = None
            return
        if self.runtime.precision in FP8_PRECISIONS:  # FP8 weights cast once per step (LoRA: once), not per micro-batch
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            installed_graphs(self.raw_model).track_weight_updates(None if self.config.lora else optimizer)

    def settle(self) -> None:
        """Wait for the optimizer's queued updates (LayerwiseAdamW overlaps them with the next forward) before
        anything outside a step reads the weights: checkpoints, export."""
        join = getattr(getattr(self.optimizer, "optimizer", self.optimizer), "join", None)
        if join is not None:
            join()

    def loss_bytes(self) -> int:
        """What the loss allocates beside the graphs: a chunk of BF16 logits and the lm_head's
        gradient twice (fused loss), or three FP32 logits tensors (transformers' loss)."""
        config, tokens = self.raw_model.config, self.graph_shape.tokens
        if self.features.fused_loss:
            return min(tokens, chunk_tokens(config.vocab_size, 2)) * config.vocab_size * 2 + \
                2 * config.vocab_size * config.hidden_size * 2
        return 3 * tokens * config.vocab_size * 4

    def __call__(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, Any]:
        loss_sum = torch.zeros((), device=self.runtime.device)
        for batch in micro_batches:
            inputs = {k: v.to(self.runtime.device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            with autocast(self.runtime.precision):
                loss = self.loss(inputs)
            self.accelerator.backward(loss / len(micro_batches))
            loss_sum += loss.detach()
        grad_norm = self._clip() if self._clip is not None else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.lora_base == "fp8" and self.graph_shape is None:  # graphs keep theirs in their pool
            release_weight_transposes(self.raw_model)
        return loss_sum / len(micro_batches), grad_norm


@contextlib.contextmanager
def _side_stream(device: torch.device | None):
    """Run the block on a fresh CUDA stream (then join it). DDP makes each parameter's gradient-accumulation
    node when it is built, on the stream current then; a CUDA graph's backward captured later on another
    stream must not depend on the default stream (cudaErrorStreamCaptureImplicit), so DDP is built on a
    side stream, as torch's CUDA graphs notes prescribe."""
    if device is None or device.type != "cuda":
        yield
        return
    side, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def build_train_step(config: FinetuneConfig, runtime: Runtime, model: Any, accelerator: Accelerator, steps: int,
                     world: int = 1, graph_shape: StaticShape | None = None) -> TrainStep:
    """The configured step for `model` (already converted; sharded here under FSDP2).

    `graph_shape`: the packed micro-batch the CUDA graphs are captured for, when they are on.
    """
    features = resolve_features(config, runtime, model, world)
    trained = LossModel(model) if features.fused_loss else model  # the forward DDP and FSDP2 hook into
    fsdp = config.parallel == "fsdp2"
    if fsdp:  # before the optimizer: sharding replaces the parameters
        shard_fsdp2(model, root=trained)
    optimizer = make_optimizer(config, runtime, model, features)
    scheduler = get_scheduler(config.schedule if config.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(config.warmup_ratio * steps), num_training_steps=steps)
    if not fsdp:  # the schedule counts global steps, so it stays outside prepare() (stepped once per process)
        with _side_stream(runtime.device if world > 1 else None):
            trained, optimizer = accelerator.prepare(trained, optimizer)
        if world > 1:  # by design (_side_stream): each gradient is accumulated on the stream DDP was built on
            quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
            if quiet is not None:
                quiet(False)
            else:
                warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
    clip = None
    if config.max_grad_norm > 0:
        params = [p for p in model.parameters() if p.requires_grad]
        clip = (lambda: torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)) if fsdp else \
            (lambda: accelerator.clip_grad_norm_(params, config.max_grad_norm))
    return TrainStep(config, runtime, features, trained, model, optimizer, scheduler, accelerator,
                     graph_shape if features.cuda_graphs else None, clip)


def memory_fixes(config: FinetuneConfig, runtime: Runtime, graphed: bool, layers: int | None = None) -> list[str]:
    """The options that lower this run's GPU memory, most effective first (`config` as planned: a number of
    examples per micro-batch, not "auto"; `layers`: the model's decoder layers, when known)."""
    fixes = [f"--batch-size {max(1, config.batch_size // 2)} (now {config.batch_size}; add --grad-accum "
             f"{2 * config.grad_accum} to keep the batch)" if config.batch_size > 1 else
             f"--max-seq-len {max(1, config.max_seq_len // 2)} (now {config.max_seq_len})"]
    if not config.activation_checkpointing:
        fixes.append("--activation-checkpointing (recompute layers in backward: about a third more compute; "
                     "--activation-checkpointing-layers N recomputes only the first N)")
    elif config.activation_checkpointing_layers is not None and \
            (layers is None or config.activation_checkpointing_layers < layers):  # some layers still run plainly
        fixes.append(f"more recomputed layers: raise --activation-checkpointing-layers (now "
                     f"{config.activation_checkpointing_layers}), or leave it out to recompute every layer")
    if graphed:
        fixes.append("--no-cuda-graphs (graphs keep their activation memory reserved)")
    if runtime.param_dtype == torch.float32 and runtime.device.type == "cuda":
        fixes.append("--param-dtype bfloat16")
    fixes.append("several GPUs with --parallel fsdp2 (shards weights and optimizer state)")
    if runtime.memory_cap:
        fixes.append(f"or allow more with --max-memory (now {runtime.memory_cap / 2**30:g} GiB)")
    return fixes
