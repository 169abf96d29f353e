"""Training checkpoints: written atomically, the last K kept, resumed exactly, loaded as data only.

A checkpoint is a directory `step-00000123/` holding the model, optimizer and scheduler state
and the RNG states (`state.pt`), then its format and data position (`meta.json`, written last).
It is written under a temporary name and renamed into place only when complete, and an old one
is renamed to a hidden name before it is deleted: a crash or kill at any moment leaves complete
checkpoints plus hidden leftovers, which `sweep_incomplete` removes on the next start.

Loading runs no code from the run folder, which someone else may be able to write to:
`state.pt` holds tensors and plain Python data only and is read with
`torch.load(weights_only=True)`. Transformer Engine's FP8 extra state is a pickle that TE
unpickles itself, so it is first read here with only tensors and TE's recipe classes allowed.
"""

from __future__ import annotations

import collections
import importlib
import io
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..model.hf_checkpoint import (
    follow_umask,
    make_staging_dir,
    removed_on_failure,
    sweep_interrupted_save,
)
from ..model.mapping import TE_EXTRA_STATE_SUFFIX

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"
META_FILE = "meta.json"
PREFIX = "step-"
FORMAT = 2
"""meta.json's "format": 2 = state as data only (1, unrecorded, was a pickle of Python objects)."""
EXPORT_NAME = "final"
MERGED_EXPORT_NAME = "final-merged"
EXPORT_NAMES = (EXPORT_NAME, MERGED_EXPORT_NAME)
"""The exports of a run: the finetuned model (a PEFT adapter for LoRA), and a LoRA run's merged model."""


@dataclass
class Position:
    """Where training is: optimizer steps done and micro-batches consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def refusal(file: Path, problem: str) -> CheckpointError:
    """The error for a checkpoint (a step-N folder or a file in it) not in te-llama's data-only format."""
    step_dir = file if _step_of(file.name) is not None else file.parent
    final = step_dir.parent.parent / EXPORT_NAME  # OUTPUT_DIR/checkpoints/step-N
    return CheckpointError(
        f"{file}: {problem}. te-llama loads checkpoints as data only and never runs code from them, so a "
        "checkpoint written by an older te-llama (a pickle of Python objects) cannot be resumed. Start a new "
        f"run in another --output-dir instead, e.g. from this run's exported model if it has one (--model {final}).")


def load_data(file: Path) -> Any:
    """torch.load of tensors and plain Python data only; anything else is refused unread."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; resume from another one "
                              "or start a new run")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refusal(file, "it holds Python objects, not only tensors and plain data") from exc
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt ({exc}); resume from another checkpoint") from exc


def write_meta(folder: Path, position: Position) -> None:
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **asdict(position)}))


def read_meta(path: Path) -> Position:
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); resume from another checkpoint") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise refusal(file, "it records no checkpoint format (an older te-llama wrote it)" if found is None else
                      f"checkpoint format {found!r}, while this te-llama reads format {FORMAT}")
    try:
        return Position(**{f.name: int(meta[f.name]) for f in fields(Position)})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file} has no valid data position ({exc!r}); resume from another checkpoint") from exc


# ---- RNG states, as tensors and numbers

def rng_states() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                         "gauss_next": gauss_next},
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                        "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    python, numpy = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- Transformer Engine's FP8 extra state

RECIPE_MODULES = ("transformer_engine.common.recipe", "te_llama.fp8_recipes")
TE_TRUSTS_PICKLED_EXTRA_STATE = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def _tensor_storage(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                   ("torch.storage", "_load_from_bytes"): _tensor_storage,  # torch's own reads with weights_only=False
                   ("collections", "OrderedDict"): collections.OrderedDict}


class _ExtraStateUnpickler(pickle.Unpickler):
    """Resolves only what TE pickles into `_extra_state`: CPU tensors and recipe classes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[module, name]
        if module in RECIPE_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor or an FP8 recipe class")


def vet_extra_states(state_dict: dict[str, Any], file: Path) -> bool:
    """Replace each TE `_extra_state` that holds a pickle (FP8 delayed scaling's scales and amax
    history) by a re-pickled copy of what it holds, read with only tensors and recipe classes
    allowed; anything else refuses the checkpoint. True if there was any."""
    vetted = False
    for key, value in state_dict.items():
        if not key.endswith(TE_EXTRA_STATE_SUFFIX) or value is None:
            continue
        if not torch.is_tensor(value) or value.dtype != torch.uint8:
            raise refusal(file, f"{key} is not TE's extra state (a byte tensor)")
        if value.numel() == 0:
            continue
        try:
            content = _ExtraStateUnpickler(io.BytesIO(value.detach().cpu().numpy().tobytes())).load()
        except Exception as exc:
            raise refusal(file, f"{key} holds something other than FP8 scaling tensors and a recipe ({exc})") from exc
        state_dict[key] = torch.frombuffer(bytearray(pickle.dumps(content)), dtype=torch.uint8)
        vetted = True
    return vetted


@contextmanager
def extra_state_vetted(state_dict: dict[str, Any], file: Path) -> Iterator[None]:
    """Load a model state dict from `file` inside this block: TE's extra state in it is vetted
    first (`vet_extra_states`). TE >= 2.18 refuses pickled extra state unless told its source is
    trusted; the bytes it then reads were pickled here from vetted data, so it is told so."""
    if not vet_extra_states(state_dict, file):
        yield
        return
    before = os.environ.get(TE_TRUSTS_PICKLED_EXTRA_STATE)
    os.environ[TE_TRUSTS_PICKLED_EXTRA_STATE] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[TE_TRUSTS_PICKLED_EXTRA_STATE]
        else:
            os.environ[TE_TRUSTS_PICKLED_EXTRA_STATE] = before


# ---- the checkpoint directories

def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p.name) is not None and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: _step_of(p.name))


def _step_of(name: str) -> int | None:
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def discard(path: Path) -> None:
    """Delete a checkpoint without ever leaving a part of it under its own name: renamed to a
    hidden name first (one atomic step), then removed."""
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_incomplete(root: Path) -> None:
    """Remove what interrupted saves and deletions left: `.step-N.tmp-*` (a save), `.step-N.deleting-*`
    (a pruned checkpoint) and `step-N` folders without meta.json. Nothing else is touched."""
    if not root.is_dir():
        return
    leftovers = [*root.glob(f".{PREFIX}*.tmp-*"), *root.glob(f".{PREFIX}*.deleting-*"),
                 *(p for p in root.iterdir() if _step_of(p.name) is not None and not (p / META_FILE).exists())]
    for leftover in leftovers:
        if leftover.is_dir() and not leftover.is_symlink():
            logger.warning("removing incomplete checkpoint %s (interrupted save or deletion)", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def sweep_interrupted_exports(output_dir: Path) -> None:
    """Clean up after a killed export of OUTPUT_DIR/final or final-merged
    (`te_llama.model.hf_checkpoint.sweep_interrupted_save`)."""
    for name in EXPORT_NAMES:
        sweep_interrupted_save(output_dir / name)


def kept_checkpoint(root: Path) -> str:
    """What survives a failed save, for its error message."""
    found = checkpoints(root)
    return f"The last checkpoint, {found[-1]}, is intact." if found else "There is no earlier checkpoint."


def publish_checkpoint(staging: Path, final: Path, keep_last: int) -> None:
    """Rename a complete staging directory into place, then prune to the newest `keep_last`."""
    follow_umask(staging)
    if final.exists():
        discard(final)
    staging.rename(final)
    for old in checkpoints(final.parent)[:-keep_last] if keep_last > 0 else []:
        discard(old)


def trainable_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a LoRA checkpoint keeps of the model: the trainable parameters (the adapters) and TE's
    `_extra_state` (FP8 scaling history); the frozen base is the model it was loaded from."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable or k.endswith(TE_EXTRA_STATE_SUFFIX)}


def load_trainable_state(model: torch.nn.Module, state: dict[str, Any], file: Path) -> None:
    """Load `trainable_state`'s tensors, checking they are exactly this model's (the frozen rest stays)."""
    expected = trainable_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file}: its trainable weights do not match this model's (missing {missing[:4] or 'none'}, "
                              f"unexpected {unexpected[:4] or 'none'}); resume with the settings the run started with")
    model.load_state_dict(state, strict=False)  # only the frozen parameters are left out, checked above


def save_checkpoint(root: Path, position: Position, model: torch.nn.Module, optimizer, scheduler,
                    keep_last: int, trainable_only: bool = False) -> Path:
    """trainable_only (LoRA): the adapters and the optimizer state, not the frozen base."""
    name = f"{PREFIX}{position.step:08d}"
    staging = make_staging_dir(root, f".{name}.tmp-")
    with removed_on_failure(staging, f"checkpoint {name}", kept_checkpoint(root)):
        model_state = trainable_state(model) if trainable_only else model.state_dict()
        state = {"model": model_state, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_states()}
        torch.save(state, staging / STATE_FILE)
        write_meta(staging, position)
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        publish_checkpoint(staging, root / name, keep_last)
    return root / name


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, trainable_only: bool = False
                    ) -> Position:
    position = read_meta(path)
    state = load_data(path / STATE_FILE)
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng"} <= state.keys():
        raise CheckpointError(f"{path / STATE_FILE} is not a te-llama training state (model, optimizer, "
                              "scheduler, rng); resume from another checkpoint or start a new run")
    with extra_state_vetted(state["model"], path / STATE_FILE):
        if trainable_only:
            load_trainable_state(model, state["model"], path / STATE_FILE)
        else:
            model.load_state_dict(state["model"])
    saved_groups = len(state["optimizer"]["param_groups"])
    optimizer.load_state_dict(in_group_layout(state["optimizer"], optimizer, model, path / STATE_FILE))
    scheduler.load_state_dict(per_group_schedule(state["scheduler"], saved_groups, len(optimizer.param_groups)))
    restore_rng_states(state["rng"])
    return position


def per_group_schedule(saved: dict, saved_groups: int, groups: int) -> dict:
    """A learning-rate schedule's state saved for one parameter group, for `groups` groups (see
    `in_group_layout`): its per-group lists repeated (te-llama's groups share every setting)."""
    if saved_groups == groups:
        return saved
    return saved | {key: value * groups for key, value in saved.items()
                    if key in ("base_lrs", "_last_lr", "lr_lambdas") and isinstance(value, list) and len(value) == 1}


def in_group_layout(saved: dict, optimizer, model: torch.nn.Module, file: Path) -> dict:
    """An optimizer state in `optimizer`'s parameter groups. Earlier te-llama versions saved one group
    (with --grad-accum above 1 or several processes), today one per decoder layer: the same parameters
    in another order, mapped through the model's trainable parameters (the old group's order)."""
    groups, old = optimizer.param_groups, saved["param_groups"]
    if len(old) == len(groups):
        return saved
    trainable = [p for p in model.parameters() if p.requires_grad]
    if len(old) != 1 or len(old[0]["params"]) != len(trainable):
        raise CheckpointError(f"{file}: its optimizer state has {len(old)} parameter groups, this run's optimizer "
                              f"{len(groups)}; resume with the settings the run started with")
    index_of = {id(p): index for p, index in zip(trainable, old[0]["params"])}
    state, layout, position = {}, [], 0
    for group in groups:
        indices = list(range(position, position + len(group["params"])))
        for new, param in zip(indices, group["params"]):
            if index_of[id(param)] in saved["state"]:
                state[new] = saved["state"][index_of[id(param)]]
        layout.append(old[0] | {"params": indices})
        position += len(indices)
    return {"state": state, "param_groups": layout}
