"""HF checkpoint directories: load straight into converted models, export back bit-identical."""

from __future__ import annotations

import copy
import errno
import json
import os
import pathlib

import pytest
import safetensors.torch
import torch
from conftest import random_hf_model
from transformers import AutoModelForCausalLM

import te_llama
from te_llama import CheckpointError, UnsupportedArchitectureError, WeightMappingError
from te_llama.errors import DiskFullError
from te_llama.model import hf_checkpoint as checkpoint_module
from te_llama.model.builtin import builtin_tokenizer

MAX_RELATIVE_ERROR = 1e-5
SMALL_SHARD_BYTES = 40_000  # forces several shards on the tiny models


def assert_state_dicts_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_save_pretrained_round_trips_bit_identical(arch: str, fuse_qkv: bool, tmp_path) -> None:
    hf = random_hf_model(arch)
    original = copy.deepcopy(hf.state_dict())
    converted = te_llama.convert(hf, backend="reference", fuse_qkv=fuse_qkv)
    te_llama.save_pretrained(converted, tmp_path / "out", max_shard_bytes=SMALL_SHARD_BYTES)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_state_dicts_identical(reloaded.state_dict(), original)
    assert reloaded.config.use_cache is True  # restored for inference users
    assert reloaded.generation_config.use_cache is not False


@pytest.mark.parametrize("shard_bytes", [None, SMALL_SHARD_BYTES], ids=["single-file", "sharded"])
def test_from_pretrained_matches_hf(arch: str, shard_bytes, tmp_path) -> None:
    hf = random_hf_model(arch)
    hf.save_pretrained(tmp_path, max_shard_size=shard_bytes or "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard_bytes)
    ours = te_llama.from_pretrained(tmp_path, backend="reference", fuse_qkv=True)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(ids).logits, ours(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= MAX_RELATIVE_ERROR
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_embedding_scale_is_rebuilt_on_load(dtype, tmp_path) -> None:
    """Gemma scales its embeddings by sqrt(hidden) in a non-persistent buffer no checkpoint holds:
    loaded models have it off the meta device, rounded to the model's dtype as in transformers."""
    hf = random_hf_model("gemma-mha-bias")  # hidden 40: sqrt(40) is not exact in BF16
    hf.save_pretrained(tmp_path)
    ours = te_llama.from_pretrained(tmp_path, torch_dtype=dtype)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    scale = te_llama.ArchitectureSpec.from_hf_config(hf.config).embedding_scale
    assert torch.equal(ours.model.embed_tokens.embed_scale, vanilla.model.embed_tokens.embed_scale)
    assert float(ours.model.embed_tokens.embed_scale) == float(torch.tensor(scale, dtype=dtype))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(ours.model.embed_tokens(ids), vanilla.model.embed_tokens(ids))
        assert torch.equal(ours(ids).logits, te_llama.convert(vanilla, backend="reference")(ids).logits)


def test_from_pretrained_honours_dtype(tmp_path) -> None:
    random_hf_model("llama2-mha").save_pretrained(tmp_path)
    model = te_llama.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_export_has_index_and_reloads(tmp_path) -> None:
    converted = te_llama.convert(random_hf_model("mistral-gqa"), backend="reference")
    te_llama.save_pretrained(converted, tmp_path / "ckpt", max_shard_bytes=SMALL_SHARD_BYTES)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert te_llama.from_pretrained(tmp_path / "ckpt") is not None


def test_not_a_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        te_llama.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        te_llama.from_pretrained(tmp_path)


def test_bin_only_checkpoint_names_the_fix(tmp_path) -> None:
    random_hf_model("llama2-mha").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="safe_serialization"):
        te_llama.from_pretrained(tmp_path)


def test_unsupported_config_fails_before_reading_weights(tmp_path) -> None:
    model = random_hf_model("llama2-mha")
    model.config.hidden_act = "gelu"
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act='gelu'"):
        te_llama.from_pretrained(tmp_path)


def _rewrite_weights(path, edit) -> None:
    file = path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    edit(tensors)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"), r"model\.layers\.1\..*v_proj\.weight"),
        (lambda t: t.pop("model.norm.weight"), r"model\.norm\.weight"),
        (lambda t: t.__setitem__("model.extra.weight", torch.ones(2)), r"model\.extra\.weight: unexpected"),
        (lambda t: t.__setitem__("model.layers.0.mlp.gate_proj.weight", torch.ones(3, 64)),
         r"gate_proj\.weight: shape \(3, 64\).*\(160, 64\)"),
        (lambda t: t.__setitem__("model.embed_tokens.weight", torch.ones(5, 64)),
         r"embed_tokens\.weight: shape \(5, 64\).*\(128, 64\)"),
    ],
    ids=["missing-layer-tensor", "missing-final-norm", "unexpected", "misshaped-layer", "misshaped-embedding"],
)
def test_bad_weights_are_named(tmp_path, edit, message) -> None:
    random_hf_model("llama2-mha").save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, edit)
    with pytest.raises(WeightMappingError, match=message):
        te_llama.from_pretrained(tmp_path)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    converted = te_llama.convert(random_hf_model("llama2-mha"), backend="reference")
    target = tmp_path / "ckpt"
    te_llama.save_pretrained(converted, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    calls = {"n": 0}
    real_save = checkpoint_module.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    with torch.no_grad():
        converted.model.norm.weight.add_(1.0)  # the new save would differ
    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        te_llama.save_pretrained(converted, target, max_shard_bytes=SMALL_SHARD_BYTES)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging left behind
    AutoModelForCausalLM.from_pretrained(target)


def test_save_requires_a_converted_model(tmp_path) -> None:
    with pytest.raises(ValueError, match="not converted"):
        te_llama.save_pretrained(random_hf_model("llama2-mha"), tmp_path / "x")


@pytest.mark.parametrize("damage", ["cut-in-half", "garbage"])
def test_a_truncated_or_corrupt_shard_is_named_before_loading(tmp_path, damage) -> None:
    random_hf_model("mistral-gqa").save_pretrained(tmp_path, max_shard_size=SMALL_SHARD_BYTES)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2] if damage == "cut-in-half" else os.urandom(len(data)))
    with pytest.raises(CheckpointError, match=f"{shard} is truncated or corrupt .*download or save it again"):
        te_llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_follows_the_umask(tmp_path, umask) -> None:
    converted = te_llama.convert(random_hf_model("llama2-mha"), backend="reference")
    before = os.umask(umask)
    try:
        te_llama.save_pretrained(converted, tmp_path / "final", max_shard_bytes=SMALL_SHARD_BYTES,
                                 tokenizer=builtin_tokenizer())
    finally:
        os.umask(before)
    files = list((tmp_path / "final").iterdir())
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o666 & ~umask for f in files}


def test_export_on_a_full_disk(tmp_path, monkeypatch) -> None:
    converted = te_llama.convert(random_hf_model("llama2-mha"), backend="reference")
    te_llama.save_pretrained(converted, tmp_path / "final")
    before = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}

    def no_space(tensors, file, metadata=None):
        pathlib.Path(file).write_bytes(b"partial")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(checkpoint_module, "save_file", no_space)
    with pytest.raises(DiskFullError) as caught:
        te_llama.save_pretrained(converted, tmp_path / "final")
    assert caught.value.errno == errno.EDQUOT and isinstance(caught.value, OSError)
    assert str(caught.value).startswith(f"the disk is full: writing the HF export {tmp_path / 'final'} into {tmp_path} "
                                        f"failed ({os.strerror(errno.EDQUOT)}; ")
    assert f"The export already at {tmp_path / 'final'} is intact. The partial copy was removed." in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()} == before
