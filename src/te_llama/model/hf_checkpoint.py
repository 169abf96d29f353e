"""HF checkpoint directories in and out, streamed shard by shard.

`from_pretrained` builds the HF model on the meta device, installs empty TE-layout layers
on the target device, then reads safetensors one tensor at a time and converts each decoder
layer as soon as it is complete: no full copy of the model exists on the host.
`save_pretrained` writes plain HF layout (config + safetensors, sharded above a size) into
a temporary directory and renames it into place, so a crash never leaves a half checkpoint.
The staging helpers here serve the training checkpoints too: what they write gets the
permissions the user's umask gives, and a full disk is reported as such with the staging removed.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import CheckpointError, DiskFullError, WeightMappingError
from .convert import conversion_of, decoder_layers, install_layers, load_layer_weights, te_layout_tensors
from .lora import LORA_PREFIX, LoraSpec, merged_weights
from .mapping import LAYER_PREFIX, split_layer_key, stream_hf_to_te, te_layer_to_hf
from .spec import ArchitectureSpec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
logger = logging.getLogger(__name__)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory, or a CheckpointError saying why not."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass an HF checkpoint directory (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not an HF checkpoint: config.json is missing")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{path}: shards named in {INDEX_FILE} are missing: {absent}")
        return [_check_safetensors(file) for file in files]
    if (path / SINGLE_FILE).is_file():
        return [_check_safetensors(path / SINGLE_FILE)]
    if any(path.glob("*.bin")):
        raise CheckpointError(
            f"{path} holds PyTorch .bin weights only; re-save it as safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{path} has config.json but no {SINGLE_FILE} or {INDEX_FILE}")


def _check_safetensors(file: Path) -> Path:
    """Reads the header only: safetensors checks it parses and that the file is exactly as long
    as its tensors, so a cut-off download or a half-copied shard is named before any loading."""
    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except SafetensorError as exc:
        raise CheckpointError(f"{file} is truncated or corrupt ({exc}); download or save it again") from exc
    return file


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, device, dtype) -> None:
    """Materialize one non-layer parameter (embeddings, final norm, lm_head) from the checkpoint."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    current = getattr(module, attr, None) if module is not None else None
    if not isinstance(current, nn.Parameter):
        raise WeightMappingError(f"{name}: unexpected tensor; this model has no such parameter")
    if tuple(current.shape) != tuple(tensor.shape):
        raise WeightMappingError(
            f"{name}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(current.shape)} expected from the config"
        )
    setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=current.requires_grad))


def _default_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "te" else torch.device("cpu")


def from_pretrained(path: str | os.PathLike, backend: str = "reference", torch_dtype: torch.dtype | None = None,
                    fuse_qkv: bool = False, device: torch.device | str | None = None, lora: LoraSpec | None = None,
                    base_recipe: Any = None) -> Any:
    """Load a local HF checkpoint (single or sharded safetensors) straight into a converted model.

    lora / base_recipe: LoRA layers (new adapters, the rest frozen), their frozen GEMM weights in FP8
    with that TE recipe (`te_llama.model.convert.install_layers`)."""
    path = Path(path)
    files = checkpoint_files(path)
    config = AutoConfig.from_pretrained(path)
    spec = ArchitectureSpec.from_hf_config(config)
    dtype = torch_dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else _default_device(backend)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_layers(model, backend, fuse_qkv, device=device, dtype=dtype, lora=lora, base_recipe=base_recipe)
    layers = decoder_layers(model)
    loaded_layers: set[int] = set()
    for index, tensors in stream_hf_to_te(_read_tensors(files), spec, fuse_qkv):
        if index is None:
            for name, tensor in tensors.items():
                _set_tensor(model, name, tensor, device, dtype)
            continue
        typed = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        load_layer_weights(layers[index], typed, spec, fuse_qkv, where=f"{LAYER_PREFIX}{index}.")
        loaded_layers.add(index)

    missing_layers = sorted(set(range(spec.num_layers)) - loaded_layers)
    if missing_layers:
        raise WeightMappingError(f"{path}: no weights for decoder layers {missing_layers}")
    if spec.tie_word_embeddings:
        model.tie_weights()
    _rebuild_buffers(model, config, device)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if still_meta:
        raise WeightMappingError(f"{path}: the checkpoint has no values for {still_meta}")
    return model.eval()


def _rebuild_buffers(model: nn.Module, config: Any, device: torch.device) -> None:
    """HF modules hold non-persistent buffers made at init, which no checkpoint has: recreate them off
    the meta device. The rotary module's inverse frequencies; Gemma's embedding scale (sqrt(hidden_size),
    `scalar_embed_scale` on its embedding module), in the buffer's own dtype as HF's init makes it."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        base.rotary_emb = type(rotary)(config=config).to(device)
    embedding = model.get_input_embeddings()
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is not None and embedding.embed_scale.device.type == "meta":
        embedding.embed_scale = torch.tensor(scale, dtype=embedding.embed_scale.dtype, device=device)


def hf_state_dict_by_layer(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """The converted model's weights in HF names, produced one decoder layer at a time.

    `state_dict` (a full TE-layout state dict, e.g. gathered from FSDP2 shards) replaces the
    model's own tensors when given. A LoRA model's weights come merged (W + B A alpha / r, as
    PEFT's `merge_and_unload`): the model that trained, as one plain checkpoint.
    """
    info = conversion_of(model)
    full = state_dict if state_dict is not None else model.state_dict()
    for name, tensor in full.items():
        if split_layer_key(name) is None and not name.endswith("_extra_state"):
            if info.spec.tie_word_embeddings and name == "lm_head.weight":
                continue  # HF stores tied weights once
            yield name, tensor
    for index, layer in enumerate(decoder_layers(model)):
        prefix = f"{LAYER_PREFIX}{index}."
        own = layer.state_dict() if state_dict is None else \
            {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        hf = te_layer_to_hf(te_layout_tensors(layer, own), info.spec, info.fuse_qkv, where=prefix)
        if info.lora is not None:
            adapters = {k[len(LORA_PREFIX):]: v for k, v in own.items() if k.startswith(LORA_PREFIX)}
            hf |= dict(merged_weights(hf, adapters, info.lora.scaling))
        for local, tensor in hf.items():
            yield prefix + local, tensor


def _export_config(model: nn.Module, dtype: torch.dtype):
    info = conversion_of(model)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.use_cache = info.use_cache
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    return config


def save_pretrained(model: nn.Module, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    tokenizer: Any = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an HF-layout checkpoint that plain `AutoModelForCausalLM.from_pretrained` loads.

    Written to a temporary sibling directory and renamed into place; an existing checkpoint
    at `path` is replaced only once the new one is complete. A tokenizer given is saved with it;
    `state_dict` (full, TE layout) overrides the model's own tensors, for sharded models.
    """
    path = Path(path)
    staging = make_staging_dir(path.parent, f".{path.name}.tmp-")
    kept = f"The export already at {path} is intact." if path.exists() else f"Nothing was written to {path}."
    with removed_on_failure(staging, f"the HF export {path}", kept):
        weight_map, total_bytes, dtype = _write_shards(model, staging, max_shard_bytes, state_dict)
        _export_config(model, dtype).save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            exported = copy.deepcopy(generation_config)
            exported.use_cache = conversion_of(model).generation_use_cache
            exported.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        follow_umask(staging)
        replace_directory(staging, path)
    return path


def _write_shards(model: nn.Module, staging: Path, max_shard_bytes: int,
                  state_dict: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, str], int, torch.dtype]:
    """Stream HF tensors into safetensors files of at most `max_shard_bytes` (one shard in memory)."""
    current: dict[str, torch.Tensor] = {}
    current_bytes, total, dtype = 0, 0, None
    written: list[Path] = []
    shard_of: dict[str, int] = {}

    def flush() -> None:
        name = staging / f"shard-{len(written):05d}.safetensors"
        save_file(current, str(name), metadata={"format": "pt"})
        written.append(name)

    for name, tensor in hf_state_dict_by_layer(model, state_dict):
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
            current, current_bytes = {}, 0
        dtype = dtype or tensor.dtype
        current[name] = tensor.detach().to("cpu", copy=True).contiguous()  # own storage, as safetensors needs
        shard_of[name] = len(written)
        current_bytes += size
        total += size
    flush()
    count = len(written)
    final = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for temp, name in zip(written, final):
        temp.rename(staging / name)
    return {name: final[i] for name, i in shard_of.items()}, total, dtype or torch.float32


def replace_directory(staging: Path, target: Path) -> None:
    """Move a finished directory to `target`; the old one is removed only after the swap."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
    staging.rename(target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def sweep_interrupted_save(path: Path) -> None:
    """Clean up after a `save_pretrained(..., path)` that was killed: remove its staging
    (`.NAME.tmp-*`) and the previous copy it was replacing (`.NAME.old-*`). Killed between the
    two renames of `replace_directory`, `path` is missing and the old copy is the only complete
    one: it is put back instead. Nothing but those names is ever touched."""
    old = sorted(p for p in path.parent.glob(f".{path.name}.old-*") if p.is_dir())
    if old and not path.exists():
        logger.warning("restoring %s from %s (a save was interrupted while replacing it)", path, old[-1])
        old.pop().rename(path)
    for leftover in [*path.parent.glob(f".{path.name}.tmp-*"), *old]:
        if leftover.is_dir() and not leftover.is_symlink():
            logger.warning("removing %s (left by an interrupted save of %s)", leftover, path)
            shutil.rmtree(leftover, ignore_errors=True)


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory `parent/PREFIX<random>` to write into before renaming it into place."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the user's umask gives new files
    (mkdtemp makes 0700 folders and some writers 0600 files: others in the group could not read
    a finished export or checkpoint)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for entry in [folder, *folder.rglob("*")]:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


@contextmanager
def removed_on_failure(staging: Path, what: str, kept: str) -> Iterator[None]:
    """Remove `staging` if the block fails; a full disk becomes a DiskFullError saying so.
    what: what was being written ("checkpoint step-00000008"); kept: what is still intact."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk_full(exc, staging.parent, what, kept) from exc
        raise


def disk_full(exc: OSError, folder: Path, what: str, kept: str) -> DiskFullError:
    """The error for a write into `folder` that failed with ENOSPC or EDQUOT."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free there now"
    except OSError:
        free = "its free space could not be read"
    return DiskFullError(exc.errno, f"the disk is full: writing {what} into {folder} failed "
                                    f"({os.strerror(exc.errno)}; {free}). {kept} The partial copy was removed. "
                                    "Free some space, keep fewer checkpoints (--keep-last 1) or write to "
                                    "another --output-dir, then run again (--resume continues from the last "
                                    "checkpoint).")
