"""Several processes for finetune: DDP through accelerate, or torch FSDP2 per decoder layer.

FSDP2 (`fully_shard`) shards each decoder layer and the root; its training checkpoints are
sharded with torch.distributed.checkpoint (DCP), which re-shards on load, so a run can resume
on another number of processes. The final HF export gathers one full state dict on rank 0.

DCP's own reader unpickles its `.metadata` file unrestricted and reads non-tensor values with
`torch.load(weights_only=False)`; te-llama reads both with only plain data allowed, like its
own `trainer.pt` (te_llama.train.checkpoints), so resuming runs no code from the run folder.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

from ..errors import BackendUnavailableError, CheckpointError
from ..model.convert import decoder_layers
from ..model.hf_checkpoint import DISK_FULL_ERRNOS, removed_on_failure
from .checkpoints import (
    PREFIX,
    Position,
    extra_state_vetted,
    kept_checkpoint,
    load_data,
    publish_checkpoint,
    read_meta,
    refusal,
    restore_rng_states,
    rng_states,
    write_meta,
)

TRAINER_FILE = "trainer.pt"
DCP_METADATA_FILE = ".metadata"


def require_process_group(mode: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise BackendUnavailableError(f"--parallel {mode} needs a distributed launch: run under torchrun or "
                           "accelerate launch (one process is fine: --nproc_per_node 1)")


def shard_fsdp2(model: nn.Module, root: nn.Module) -> None:
    """fully_shard every decoder layer of `model`, then `root`, the module whose forward the step calls (the
    model itself, or the fused loss's `LossModel` around it): its parameters are the embeddings, final norm and
    lm_head, all-gathered before that forward and reduce-scattered after its backward."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(root)


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """All ranks take part; rank 0 gets the whole (TE-layout) state dict on the CPU (trainable_only: the
    LoRA adapters alone, without gathering the frozen base)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def _options(trainable_only: bool) -> StateDictOptions | None:
    """LoRA checkpoints hold the adapters and their optimizer state; the frozen base is left out on save and,
    checked by `_check_only_frozen_missing`, on load."""
    return StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None


def _check_only_frozen_missing(model: nn.Module, keys: Any, path: Path) -> None:
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    wrong = sorted(set(keys.missing_keys) - frozen) + sorted(keys.unexpected_keys)
    if wrong:
        raise CheckpointError(f"{path}: its trainable weights do not match this model's ({wrong[:4]}); resume with "
                              "the settings the run started with")


def grad_norm_value(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save_sharded_checkpoint(root: Path, position: Position, model: nn.Module, optimizer, scheduler,
                            keep_last: int, trainable_only: bool = False) -> Path:
    """Every rank writes its shards into a staging directory; rank 0 renames it when complete."""
    main = dist.get_rank() == 0
    name = f"{PREFIX}{position.step:08d}"
    staging = root / f".{name}.tmp-dcp"  # one name all ranks know
    kept = kept_checkpoint(root)
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    with removed_on_failure(staging, f"checkpoint {name}", kept):
        try:
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging))
        except CheckpointException as exc:  # a rank's write failed: every rank gets all failures
            raise _disk_full_in(exc) or exc
        dist.barrier()
        if main:
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_states()}, staging / TRAINER_FILE)
            write_meta(staging, position)
            publish_checkpoint(staging, root / name, keep_last)
    dist.barrier()
    return root / name


def _disk_full_in(exc: CheckpointException) -> OSError | None:
    for failure in exc.failures.values():
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
    return None


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, trainable_only: bool = False
                            ) -> Position:
    """Every rank reads its shards (re-sharded to this run's process count), as data only."""
    position = read_meta(path)
    trainer = load_data(path / TRAINER_FILE)
    if not isinstance(trainer, dict) or not {"scheduler", "rng"} <= trainer.keys():
        raise CheckpointError(f"{path / TRAINER_FILE} is not a te-llama trainer state (scheduler, rng); resume "
                              "from another checkpoint or start a new run")
    reader = DataOnlyReader(path)
    metadata = reader.read_metadata()  # refused here, by every rank, before DCP reads anything
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    sized_like_saved(model_state, metadata)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, storage_reader=reader, planner=DataOnlyPlanner(path))
    except CheckpointException as exc:  # a refusal inside DCP's read comes back wrapped
        refused = [f[0] for f in exc.failures.values() if isinstance(f, tuple) and isinstance(f[0], CheckpointError)]
        raise (refused[0] if refused else exc) from exc
    with extra_state_vetted(state["model"], path):
        keys = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                              options=_options(trainable_only))
    if trainable_only:
        _check_only_frozen_missing(model, keys, path)
    scheduler.load_state_dict(trainer["scheduler"])
    restore_rng_states(trainer["rng"])
    return position


def sized_like_saved(model_state: dict[str, Any], metadata: dcp_metadata.Metadata) -> None:
    """TE's FP8 extra state is an empty tensor until the layer's first FP8 forward, and DCP loads a tensor only
    into one of the saved size: each extra state of another size is replaced by an empty tensor of the size in
    the checkpoint, which DCP fills and TE then reads."""
    for key, value in model_state.items():
        saved = metadata.state_dict_metadata.get(f"model.{key}")
        if key.endswith("_extra_state") and torch.is_tensor(value) and \
                isinstance(saved, dcp_metadata.TensorStorageMetadata) and tuple(value.shape) != tuple(saved.size):
            model_state[key] = torch.empty(saved.size, dtype=saved.properties.dtype)


_METADATA_GLOBALS = {("torch", "Size"): torch.Size,
                     ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
                     **{("pathlib", c.__name__): c for c in (PosixPath, WindowsPath, PurePosixPath, PureWindowsPath)}}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only what DCP pickles into `.metadata`: its metadata dataclasses, torch sizes,
    dtypes and layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[module, name]
        found = getattr(dcp_metadata, name, None)
        if module == dcp_metadata.__name__ and isinstance(found, type) and found.__module__ == module:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")


class DataOnlyReader(FileSystemReader):
    """DCP's FileSystemReader, with `.metadata` unpickled with only DCP's metadata classes allowed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._checkpoint = Path(path)
        self._metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if self._metadata is None:
            file = self._checkpoint / DCP_METADATA_FILE
            try:
                with open(file, "rb") as handle:
                    metadata = _MetadataUnpickler(handle).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
                raise refusal(file, f"it is not plain DCP checkpoint metadata ({exc})") from exc
            if not isinstance(metadata, dcp_metadata.Metadata):
                raise refusal(file, f"it holds a {type(metadata).__name__}, not DCP checkpoint metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp_metadata.StorageMeta()
            self._metadata = metadata
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class DataOnlyPlanner(DefaultLoadPlanner):
    """DCP's default planner reads non-tensor values (optimizer hyperparameters) with
    `torch.load(weights_only=False)`: here they are read as data first, and DCP gets them re-saved."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._checkpoint = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            data = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise refusal(self._checkpoint, f"{read_item.dest_index.fqn} holds Python objects, not plain data") from exc
        clean = io.BytesIO()
        torch.save(data, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
