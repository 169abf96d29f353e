"""The GPU memory a run may use: the `--max-memory` cap, and what is left under it.

Why a cap: to check on a large GPU that a configuration fits a smaller one (an 80 GB H100 from a
141 GB H200), torch's per-process limit makes the allocator fail where the smaller GPU would.
"""

from __future__ import annotations

import logging
import os

import torch

from .config import ConfigError

logger = logging.getLogger(__name__)


ALLOCATOR_SETTING = "expandable_segments:True"
"""torch's allocator grows one mapped segment per stream instead of caching fixed blocks. Why: eager
layers see a new packed shape every step, and fixed blocks fragment: Llama-3-8B at 16,384 tokens per
step ran out of memory at step 4 on an H200 with 123 GiB reserved, and ran with it (docs/DESIGN.md)."""


def prefer_expandable_segments(backend: str) -> None:
    """Use `ALLOCATOR_SETTING` unless the user set PYTORCH_CUDA_ALLOC_CONF. torch reads the variable once,
    when CUDA starts: in a process that already uses CUDA (a notebook, a pytest run) nothing changes.
    Not for backend 'hf': the baseline stays transformers as users run it."""
    if backend != "hf" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING


def limit_memory(device: torch.device, max_memory_gib: float | None) -> int | None:
    """Cap this process's GPU memory at `max_memory_gib` (torch's per-process fraction, which the
    allocator enforces as out of memory); returns the cap in bytes, None without one."""
    if max_memory_gib is None:
        return None
    if device.type != "cuda":
        raise ConfigError(f"--max-memory {max_memory_gib:g} caps GPU memory, and this run has no GPU: leave it out")
    total = torch.cuda.get_device_properties(device).total_memory
    cap = int(max_memory_gib * 2**30)
    if cap > total:
        raise ConfigError(f"--max-memory {max_memory_gib:g} GiB is more than this GPU has ({total / 2**30:.1f} "
                          "GiB): lower it or leave it out")
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    logger.info("GPU memory capped at %.1f of %.1f GiB (--max-memory)", cap / 2**30, total / 2**30)
    return cap


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """AdamW's two moments, each the size and dtype of its trainable parameter (torch's AdamW and te-llama's
    Triton update alike); allocated at the first step, so planning before it counts them here."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def available_bytes(device: torch.device, cap: int | None) -> int:
    """What ordinary allocations can still get, within the cap: free GPU memory once the allocator has
    returned its unused cached blocks. (Blocks cached in a CUDA graph's private pool stay reserved and
    serve only that graph's replays, so counting them as free overstates the room by the pool's slack.)"""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free if cap is None else min(free, cap - torch.cuda.memory_reserved(device))
