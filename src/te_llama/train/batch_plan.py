"""`--batch-size auto`: the batch of each optimizer step, split into as few micro-batches as the GPU holds.

How: after a warm-up pass, probes (a forward and backward of 1, 2, 4, 8 examples of --max-seq-len tokens on
the run's own model) measure what a micro-batch needs beyond the weights: gradients, activations, FP8 weight
copies, loss chunks. The largest micro-batch whose need, with AdamW's state (allocated at the first step)
and a headroom, fits the room left on the GPU (or under --max-memory) is chosen. A size is probed only when
the earlier probes predict it fits.

The probes change no weight, leave no gradient and draw no random number of the run's; like the CUDA
graphs' warm-up they run FP8 forwards, so delayed scaling starts from their amax history.

Splitting keeps the tokens per optimizer step: 8 examples become 2 micro-batches of 4, 4 of 2 or 8 of 1,
with gradient accumulation. A resumed run reuses the split it started with.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..model.convert import release_weight_transposes
from ..precision import autocast
from .batching import collate_packed, collate_padded
from .config import FinetuneConfig
from .faults import OutOfMemory, out_of_memory
from .gpu_memory import available_bytes, optimizer_state_bytes
from .loss import LossModel
from .step import Runtime, memory_fixes

logger = logging.getLogger(__name__)

AUTO_BATCH_SIZE = 8
"""Examples per optimizer step (packing: a token budget of 8 x --max-seq-len) that `auto` starts from."""
HEADROOM_BYTES = 2 * 2**30
HEADROOM_SHARE = 0.05
"""Left free beside the planned need: 2 GiB plus 5% of the memory the run may use, for what a training step
allocates that the probes do not (gradient accumulation's temporaries, other packed shapes, evaluation,
checkpoints, fragmentation)."""


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int
    """Examples (packing: token budget / max_seq_len) per micro-batch."""
    grad_accum: int
    """Micro-batches per optimizer step."""


def plan_batch(config: FinetuneConfig, runtime: Runtime, model: Any, fused_loss: bool, with_cu_seqlens: bool,
               pad_token_id: int, recorded: dict[str, str] | None = None) -> BatchPlan:
    """What `--batch-size auto` means for this run: the split recorded when the run started (resuming),
    AUTO_BATCH_SIZE without a GPU to plan for or under FSDP2 (the probes would run the unsharded model),
    else the largest micro-batch whose measured need fits on every process's GPU."""
    if config.batch_size != "auto":
        return BatchPlan(config.batch_size, config.grad_accum)
    if recorded and "batch_size" in recorded:
        micro = int(recorded["batch_size"])
        return BatchPlan(micro, config.grad_accum * AUTO_BATCH_SIZE // micro)
    if not can_probe(config, runtime):
        return BatchPlan(AUTO_BATCH_SIZE, config.grad_accum)
    can_split = config.overlap_optimizer is not True  # asked for: needs one micro-batch per step
    micro = fitting_micro_batch(model, config, runtime, fused_loss, with_cu_seqlens, pad_token_id, can_split)
    if micro == 0:
        raise _nothing_fits(config, runtime, can_split)
    if runtime.device.type == "cuda":  # the run's reported peaks are training's, not the probes'
        torch.cuda.reset_peak_memory_stats(runtime.device)
    plan = BatchPlan(micro, config.grad_accum * AUTO_BATCH_SIZE // micro)
    logger.info("batch size auto: %d examples per step in %d micro-batch%s of %d (%s tokens each)",
                AUTO_BATCH_SIZE * config.grad_accum, plan.grad_accum, "" if plan.grad_accum == 1 else "es",
                plan.batch_size, f"{plan.batch_size * config.max_seq_len:,}")
    return plan


def fitting_micro_batch(model: Any, config: FinetuneConfig, runtime: Runtime, fused_loss: bool,
                        with_cu_seqlens: bool, pad_token_id: int, can_split: bool) -> int:
    """The largest micro-batch (a power of two up to AUTO_BATCH_SIZE; only that one if not `can_split`) whose
    probe, with AdamW's state and the headroom, fits the room on this GPU; 0 if none."""
    device = runtime.device
    probe = functools.partial(probe_peak, model, config, runtime, fused_loss=fused_loss,
                              with_cu_seqlens=with_cu_seqlens, pad_token_id=pad_token_id)
    probe(1)  # a process's first pass also makes one-time temporaries and what lives on (workspaces)
    room = available_bytes(device, runtime.memory_cap)
    usable = runtime.memory_cap or torch.cuda.get_device_properties(device).total_memory
    state = optimizer_state_bytes(model)
    limit = room - state - HEADROOM_BYTES - HEADROOM_SHARE * usable
    limit = _fullest_gpu(limit, device, torch.distributed.ReduceOp.MIN)
    logger.info("batch size auto: %.1f GiB free for training, less AdamW's state (%.1f GiB) and the headroom: "
                "%.1f GiB for a micro-batch", room / 2**30, state / 2**30, limit / 2**30)
    sizes = [2**k for k in range(AUTO_BATCH_SIZE.bit_length()) if can_split or 2**k == AUTO_BATCH_SIZE]

    def logged_probe(micro: int) -> float | None:
        # every process probes the same sizes in the same order: FP8 delayed scaling reduces amaxes across them
        peak = _fullest_gpu(probe(micro), device, torch.distributed.ReduceOp.MAX)
        logger.info("batch size auto: %d x %s tokens took %s", micro, f"{config.max_seq_len:,}",
                    "more than there is" if peak is None else f"{peak / 2**30:.1f} GiB")
        return peak

    return largest_fitting(sizes, logged_probe, limit)


def _fullest_gpu(value: float | None, device: torch.device, op: Any) -> float | None:
    """`value` reduced over the processes (None, out of memory, counts as the largest), so that every process
    decides alike; as is with one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    agreed = torch.tensor([float("inf") if value is None else float(value)], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(agreed, op=op)
    return None if agreed.item() == float("inf") else agreed.item()


def largest_fitting(sizes: list[int], probe: Callable[[int], float | None], limit: float) -> int:
    """The largest of the ascending `sizes` whose `probe` (bytes; None: out of memory) is within `limit`, or 0.

    A size is probed only if the line through the last two probes predicts it fits: a probe that runs out
    of memory leaves several GiB that training then lacks. (A pass's peak is the larger of a part that
    grows with the tokens and one that does not, so the first probes can flatter the slope; the line
    through the last two is the closest.)"""
    found: dict[int, float] = {}
    best = 0
    for size in sizes:
        done = sorted(found)[-2:]
        if len(done) == 2:
            (a, pa), (b, pb) = ((n, found[n]) for n in done)
            if pb + (pb - pa) * (size - b) / (b - a) > limit:
                break
        peak = probe(size)
        if peak is None or peak > limit:
            break
        found[size], best = peak, size
    return best


def can_probe(config: FinetuneConfig, runtime: Runtime) -> bool:
    """A GPU whose memory to plan for, and a model each process holds whole (not FSDP2)."""
    return runtime.device.type == "cuda" and config.parallel != "fsdp2"


def _nothing_fits(config: FinetuneConfig, runtime: Runtime, can_split: bool) -> OutOfMemory:
    smallest = 1 if can_split else AUTO_BATCH_SIZE
    fixes = memory_fixes(replace(config, batch_size=smallest, grad_accum=config.grad_accum), runtime, graphed=False)
    if can_split and len(fixes) > 1 and fixes[1].startswith("--activation-checkpointing"):
        fixes[:2] = fixes[1::-1]  # recompute before a shorter --max-seq-len, which would cut the examples
    if not can_split:
        fixes.insert(0, "drop --overlap-optimizer (it needs one micro-batch per step, so auto cannot split the "
                        "batch)")
    why = "not even one example per micro-batch fits" if can_split else \
        "the whole batch does not fit in one micro-batch, which --overlap-optimizer needs"
    return out_of_memory(runtime.device, smallest * config.max_seq_len, fixes,
                         f"while planning --batch-size auto ({why})")


def probe_batch(micro: int, config: FinetuneConfig, vocab_size: int, with_cu_seqlens: bool,
                pad_token_id: int) -> dict[str, Any]:
    """The largest micro-batch of `micro` examples training can meet: every example --max-seq-len long
    (random ids from a private generator)."""
    rng = random.Random(0)
    examples = []
    for _ in range(micro):
        ids = [rng.randrange(vocab_size) for _ in range(config.max_seq_len)]
        examples.append({"input_ids": ids, "labels": ids})
    if config.packing:
        return collate_packed(examples, with_cu_seqlens=with_cu_seqlens).inputs
    return collate_padded(examples, pad_token_id).inputs


def probe_peak(model: Any, config: FinetuneConfig, runtime: Runtime, micro: int, fused_loss: bool,
               with_cu_seqlens: bool, pad_token_id: int) -> int | None:
    """Bytes one forward and backward of `micro` examples allocates above what was allocated before (0 off
    CUDA), None if it ran out of memory. Leaves the weights, their gradients (None after) and the run's
    random state as they were."""
    device = runtime.device
    cuda = device.type == "cuda"
    inputs = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in probe_batch(micro, config, model.config.vocab_size, with_cu_seqlens, pad_token_id).items()}
    forward = LossModel(model) if fused_loss else model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    peak, out = 0, None
    with torch.random.fork_rng(devices=[device] if cuda else []):
        try:
            with autocast(runtime.precision, device.type):
                out = forward(**inputs)
            (out if fused_loss else out.loss).backward()
            if cuda:  # reserved: what the cap and the GPU count; allocated: in case blocks were reused
                peak = max(torch.cuda.max_memory_reserved(device) - before[0],
                           torch.cuda.max_memory_allocated(device) - before[1])
        except torch.OutOfMemoryError:
            peak = None
    out = None  # noqa: F841 (freed before the cache is emptied)
    for p in model.parameters():
        p.grad = None
    if config.lora_base == "fp8":
        release_weight_transposes(model)
    if cuda:
        torch.cuda.empty_cache()
    return peak
