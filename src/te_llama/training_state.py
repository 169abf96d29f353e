"""Training checkpoints: written atomically, the last K kept, resumed exactly.

A checkpoint is a directory `step-00000123/` holding the model, optimizer and scheduler
state, the RNG states and the data position. It is written under a temporary name and
renamed into place only when complete, so a crash or kill mid-save leaves the previous
checkpoint untouched (and the temporary directory is swept on the next start).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"
META_FILE = "meta.json"
PREFIX = "step-"


@dataclass
class Position:
    """Where training is: optimizer steps done and micro-batches consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def sweep_incomplete(root: Path) -> None:
    """Remove temporary directories left by a save that was interrupted."""
    if root.is_dir():
        for leftover in root.glob(f".{PREFIX}*.tmp-*"):
            logger.warning("removing incomplete checkpoint %s (interrupted save)", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(root: Path, position: Position, model: torch.nn.Module, optimizer, scheduler,
                    keep_last: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{position.step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_states()}
    torch.save(state, staging / STATE_FILE)
    (staging / META_FILE).write_text(json.dumps(asdict(position)))
    for file in staging.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> Position:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_states(state["rng"])
    return Position(**json.loads((path / META_FILE).read_text()))
