"""`--model`: a local HF checkpoint folder, or a Hub id fetched once into the HF cache.

A value that looks like a path (absolute, relative with ./ or ../, ~, or more than one
'/') is always local: a missing folder is a local error at once, never a Hub request.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError

logger = logging.getLogger(__name__)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
"""What a finetune needs of a Hub repo: config, weights, tokenizer files, chat template."""


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") != 1


def resolve_model(value: str) -> Path:
    """The local folder holding the checkpoint `value` names (checked: config.json present)."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"--model {value}: the folder has no config.json; pass an HF checkpoint folder "
                                  "(config.json, *.safetensors, tokenizer files)")
        return path
    if path.exists():
        raise CheckpointError(f"--model {value} is a file; pass the HF checkpoint folder that holds it")
    if looks_like_path(value):
        raise CheckpointError(f"--model {value}: no such folder; pass a local HF checkpoint folder "
                              "(config.json, *.safetensors, tokenizer files)")
    return _from_hub(value)


def _from_hub(repo_id: str) -> Path:
    """The HF cache's copy of a Hub repo (downloaded the first time); errors say how to get it locally."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached yet: download below
        pass
    logger.info("--model %s: not a local folder; downloading it from the Hugging Face Hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one clear message
        raise CheckpointError(f"--model {repo_id}: not a local folder, and the Hub download failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass a local "
                              f"checkpoint folder, e.g. after `hf download {repo_id} --local-dir DIR`") from exc
