"""Training checkpoints: loaded as data only (a planted pickle never runs), pruned and swept
without ever leaving a half checkpoint under its own name, written with the umask's permissions,
and a full disk reported as such. The DCP (FSDP2) side runs in a one-process gloo group."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import pickle
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import get_scheduler

from te_llama.errors import CheckpointError, DiskFullError, TeLlamaError
from te_llama.train import checkpoints as training_state
from te_llama.train.checkpoints import (
    Position,
    checkpoints,
    load_checkpoint,
    save_checkpoint,
    sweep_incomplete,
    sweep_interrupted_exports,
)
from te_llama.train.parallel import load_sharded_checkpoint, save_sharded_checkpoint

DATA_ONLY = "te-llama loads checkpoints as data only and never runs code from them"


class TouchOnLoad:
    """Unpickling this creates `marker`: the stand-in for any code a planted pickle would run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(file: pathlib.Path, payload, raw: bool) -> None:
    if raw:
        file.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, file)


def trainer(seed: int = 0, shard=None):
    """A tiny model after one AdamW step with a schedule; `shard(model)` runs before the optimizer is built."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    if shard is not None:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.fixture
def run(tmp_path) -> pathlib.Path:
    """OUTPUT_DIR/checkpoints with one complete checkpoint, step-00000003."""
    model, optimizer, scheduler = trainer()
    save_checkpoint(tmp_path / "checkpoints", Position(3, 0, 6), model, optimizer, scheduler, keep_last=2)
    return tmp_path / "checkpoints"


def test_round_trip_restores_model_optimizer_schedule_and_rngs(tmp_path) -> None:
    model, optimizer, scheduler = trainer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, Position(3, 1, 6), model, optimizer, scheduler, keep_last=2)
    assert json.loads((path / "meta.json").read_text()) == {"format": 2, "step": 3, "epoch": 1, "batch_in_epoch": 6}
    want = draws()
    other, other_optimizer, other_scheduler = trainer(seed=7)
    assert load_checkpoint(path, other, other_optimizer, other_scheduler) == Position(3, 1, 6)
    assert draws() == want
    for got, saved in zip(other.state_dict().values(), model.state_dict().values()):
        assert torch.equal(got, saved)
    assert other_scheduler.state_dict() == scheduler.state_dict()
    for got, saved in zip(other_optimizer.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert all(torch.equal(got[k], saved[k]) for k in saved)


@pytest.mark.parametrize("raw", [False, True], ids=["torch-save", "raw-pickle"])
def test_a_state_file_with_code_is_refused_unrun(run, raw) -> None:
    marker = run.parent / "MARKER"
    state = run / "step-00000003" / "state.pt"
    plant(state, {"model": TouchOnLoad(marker), "optimizer": {}, "scheduler": {}, "rng": {}}, raw)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(run / "step-00000003", *trainer())
    message = str(caught.value)
    assert str(state) in message and DATA_ONLY in message
    assert "cannot be resumed" in message and f"--model {run.parent / 'final'}" in message
    assert not marker.exists()


@pytest.mark.parametrize("meta", [{"step": 3, "epoch": 0, "batch_in_epoch": 6},
                                  {"format": 99, "step": 3, "epoch": 0, "batch_in_epoch": 6}],
                         ids=["older-no-format", "unknown-format"])
def test_an_older_or_unknown_format_is_refused_before_its_state_is_read(run, meta) -> None:
    marker = run.parent / "MARKER"
    (run / "step-00000003" / "meta.json").write_text(json.dumps(meta))
    plant(run / "step-00000003" / "state.pt", TouchOnLoad(marker), raw=False)  # an old checkpoint is a pickle
    with pytest.raises(CheckpointError, match=f"meta.json: .*{DATA_ONLY}.*cannot be resumed. Start a new run"):
        load_checkpoint(run / "step-00000003", *trainer())
    assert not marker.exists()


# ---- Transformer Engine's extra state: a pickle TE unpickles itself

class FakeTeLayer(nn.Module):
    """A TE module's extra-state contract: bytes out, `pickle.loads` of whatever comes back in."""

    def __init__(self, extra: dict | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.extra, self.loaded = extra, None

    def get_extra_state(self) -> torch.Tensor:
        if self.extra is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(self.extra)), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.loaded = pickle.loads(state.numpy().tobytes()) if state.numel() else None


@pytest.fixture
def te_recipe_module(monkeypatch):
    """transformer_engine.common.recipe as far as the pickle goes: a recipe dataclass and an enum."""
    module = types.ModuleType("transformer_engine.common.recipe")
    fmt = __import__("enum").Enum("Format", {"HYBRID": 1, "E4M3": 2}, module=module.__name__)
    recipe = dataclasses.make_dataclass("DelayedScaling", [("amax_history_len", int), ("fp8_format", fmt)])
    recipe.__module__ = module.__name__
    module.Format, module.DelayedScaling = fmt, recipe
    for name in ["transformer_engine", "transformer_engine.common"]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_te_fp8_extra_state_round_trips_through_vetting(tmp_path, te_recipe_module) -> None:
    extra = {"recipe": te_recipe_module.DelayedScaling(16, te_recipe_module.Format.HYBRID),
             "scale_fwd": torch.rand(6), "amax_history_fwd": torch.rand(16, 6), "extra_fp8_variables": {"num_gemms": 2}}
    model, optimizer, scheduler = trainer()
    model.append(FakeTeLayer(extra))
    path = save_checkpoint(tmp_path, Position(1), model, optimizer, scheduler, keep_last=1)
    fresh, other_optimizer, other_scheduler = trainer()
    fresh.append(FakeTeLayer())
    load_checkpoint(path, fresh, other_optimizer, other_scheduler)
    loaded = fresh[2].loaded
    assert loaded["recipe"] == extra["recipe"] and loaded["extra_fp8_variables"] == {"num_gemms": 2}
    assert torch.equal(loaded["amax_history_fwd"], extra["amax_history_fwd"])
    assert "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE" not in os.environ


def test_te_extra_state_with_code_is_refused_unrun(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    model, optimizer, scheduler = trainer()
    model.append(FakeTeLayer({"scale_fwd": torch.ones(2), "recipe": TouchOnLoad(marker)}))
    path = save_checkpoint(tmp_path / "checkpoints", Position(1), model, optimizer, scheduler, keep_last=1)
    fresh = trainer()
    fresh[0].append(FakeTeLayer())
    with pytest.raises(CheckpointError, match=f"2._extra_state holds something other than FP8.*{DATA_ONLY}"):
        load_checkpoint(path, *fresh)
    assert not marker.exists() and fresh[0][2].loaded is None


# ---- DCP (FSDP2) checkpoints

@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_trainer(seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    return trainer(seed, shard=lambda model: (fully_shard(model[0]), fully_shard(model)))


def test_sharded_checkpoint_round_trips(tmp_path, process_group) -> None:
    model, optimizer, scheduler = sharded_trainer()
    random.seed(1)
    path = save_sharded_checkpoint(tmp_path, Position(4, 0, 8), model, optimizer, scheduler, keep_last=1)
    want = random.random()
    other = sharded_trainer(seed=5)
    assert load_sharded_checkpoint(path, *other) == Position(4, 0, 8)
    assert random.random() == want
    for got, saved in zip(other[0].state_dict().values(), model.state_dict().values()):
        assert torch.equal(got.full_tensor(), saved.full_tensor())
    assert other[1].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def _dcp_metadata(path: pathlib.Path):
    return pickle.loads((path / ".metadata").read_bytes())  # the test's own, trusted checkpoint


@pytest.mark.parametrize("planted", ["trainer.pt", ".metadata", "optimizer-hyperparameter"])
def test_sharded_checkpoint_with_code_is_refused_unrun(tmp_path, process_group, planted) -> None:
    marker = tmp_path / "MARKER"
    path = save_sharded_checkpoint(tmp_path / "checkpoints", Position(4), *sharded_trainer(), keep_last=1)
    if planted == "trainer.pt":
        plant(path / "trainer.pt", {"scheduler": TouchOnLoad(marker), "rng": {}}, raw=False)
    elif planted == ".metadata":
        metadata = _dcp_metadata(path)
        metadata.planner_data = TouchOnLoad(marker)
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
    else:  # a non-tensor value (DCP stores these as torch.save bytes) pointed at a planted pickle
        metadata = _dcp_metadata(path)
        index = next(i for i in metadata.storage_data if i.fqn.endswith("param_groups.0.lr"))
        planted_file = path / "__planted.distcp"
        plant(planted_file, TouchOnLoad(marker), raw=False)
        metadata.storage_data[index] = dataclasses.replace(
            metadata.storage_data[index], relative_path=planted_file.name, offset=0, length=planted_file.stat().st_size)
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=DATA_ONLY) as caught:
        load_sharded_checkpoint(path, *sharded_trainer())
    assert str(caught.value).startswith(str(path)) and f"--model {tmp_path / 'final'}" in str(caught.value)
    assert not marker.exists()


def test_sharded_save_on_a_full_disk(tmp_path, process_group, monkeypatch) -> None:
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    root = tmp_path / "checkpoints"
    model, optimizer, scheduler = sharded_trainer()
    save_sharded_checkpoint(root, Position(2), model, optimizer, scheduler, keep_last=1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_filesystem, "_write_item", no_space)
    with pytest.raises(DiskFullError, match=f"writing checkpoint step-00000004 into {root} failed"):
        save_sharded_checkpoint(root, Position(4), model, optimizer, scheduler, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


# ---- pruning, sweeping

def test_pruning_hides_a_checkpoint_before_deleting_it(run, monkeypatch) -> None:
    monkeypatch.setattr(training_state.shutil, "rmtree", lambda path, **kwargs: None)  # killed right after the rename
    save_checkpoint(run, Position(5), *trainer(), keep_last=1)
    assert [p.name for p in checkpoints(run)] == ["step-00000005"]
    assert [p.name for p in run.glob(".step-00000003.deleting-*")] == [f".step-00000003.deleting-{os.getpid()}"]


def test_sweep_removes_what_interrupted_saves_and_prunes_left_and_nothing_else(run) -> None:
    for name in [".step-00000004.tmp-abc123", ".step-00000002.deleting-77", "step-00000001", ".step-00000004.tmp-dcp"]:
        (run / name).mkdir()
        (run / name / "state.pt").write_bytes(b"half")
    foreign = ["notes", "step-abc", ".step-00000001.backup", "step-00000009.txt"]
    for name in foreign:
        (run / name).mkdir() if "." not in name[1:] else (run / name).write_text("mine")
    sweep_incomplete(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(["step-00000003", *foreign])


def test_sweep_of_interrupted_exports(tmp_path) -> None:
    out = tmp_path / "run"
    for name in ["final", ".final.tmp-x1y2", ".final.old-42"]:
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text(name)
    (out / ".final.bak").mkdir()
    (out / "final2").mkdir()
    sweep_interrupted_exports(out)
    assert sorted(p.name for p in out.iterdir()) == [".final.bak", "final", "final2"]
    assert (out / "final" / "config.json").read_text() == "final"


def test_sweep_of_an_export_killed_between_its_renames_restores_the_old_one(tmp_path) -> None:
    for name in [".final.tmp-x1y2", ".final.old-42"]:  # final renamed away, the new one not yet in place
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    sweep_interrupted_exports(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (tmp_path / "final" / "config.json").read_text() == ".final.old-42"


# ---- permissions, full disk

@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def modes(folder: pathlib.Path) -> set[int]:
    return {p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_checkpoints_follow_the_umask(tmp_path, umask) -> None:
    path = save_checkpoint(tmp_path, Position(1), *trainer(), keep_last=1)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o666 & ~umask}


def test_a_full_disk_names_the_folder_and_keeps_the_last_checkpoint(run, monkeypatch) -> None:
    def no_space(obj, path):
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training_state.torch, "save", no_space)
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(run, Position(5), *trainer(), keep_last=1)
    error = caught.value
    assert isinstance(error, OSError) and isinstance(error, TeLlamaError) and error.errno == errno.ENOSPC
    message = str(error)
    assert message.startswith(f"the disk is full: writing checkpoint step-00000005 into {run} failed (")
    assert " GiB free there now" in message and f"The last checkpoint, {run / 'step-00000003'}, is intact" in message
    assert "--keep-last 1" in message and "--output-dir" in message
    assert [p.name for p in run.iterdir()] == ["step-00000003"]  # the partial one is gone


def test_other_write_errors_pass_through_and_remove_the_staging(run, monkeypatch) -> None:
    monkeypatch.setattr(training_state.torch, "save", lambda obj, path: (_ for _ in ()).throw(PermissionError("no")))
    with pytest.raises(PermissionError, match="no"):
        save_checkpoint(run, Position(5), *trainer(), keep_last=1)
    assert [p.name for p in run.iterdir()] == ["step-00000003"]
