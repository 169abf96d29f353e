"""Several processes for finetune: DDP through accelerate, or torch FSDP2 per decoder layer.

FSDP2 (`fully_shard`) shards each decoder layer and the root; its training checkpoints are
sharded with torch.distributed.checkpoint (DCP), which re-shards on load, so a run can resume
on another number of processes. The final HF export gathers one full state dict on rank 0.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

from .convert import decoder_layers
from .errors import BackendUnavailableError
from .training_state import META_FILE, PREFIX, Position, checkpoints, restore_rng_states, rng_states

PARALLEL_MODES = ("ddp", "fsdp2")
TRAINER_FILE = "trainer.pt"


def require_process_group(mode: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise BackendUnavailableError(f"--parallel {mode} needs a distributed launch: run under torchrun or "
                           "accelerate launch (one process is fine: --nproc_per_node 1)")


def shard_fsdp2(model: nn.Module) -> nn.Module:
    """fully_shard every decoder layer, then the root (embeddings, final norm, lm_head)."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All ranks take part; rank 0 gets the whole (TE-layout) state dict on the CPU."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def grad_norm_value(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save_sharded_checkpoint(root: Path, position: Position, model: nn.Module, optimizer, scheduler,
                            keep_last: int) -> Path:
    """Every rank writes its shards into a staging directory; rank 0 renames it when complete."""
    main = dist.get_rank() == 0
    name = f"{PREFIX}{position.step:08d}"
    staging = root / f".{name}.tmp-dcp"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging))
    dist.barrier()
    final = root / name
    if main:
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_states()}, staging / TRAINER_FILE)
        (staging / META_FILE).write_text(json.dumps(asdict(position)))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> Position:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    restore_rng_states(trainer["rng"])
    return Position(**json.loads((path / META_FILE).read_text()))
