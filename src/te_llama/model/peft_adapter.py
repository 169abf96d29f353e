"""PEFT adapter folders, in and out: what `peft.PeftModel.from_pretrained(base_model, folder)` loads.

te-llama writes PEFT's format itself (`adapter_config.json`, `adapter_model.safetensors` under
PEFT's key names), so training and exporting need no peft; only using the adapter with
transformers does. A folder is written like te-llama's HF exports: into a temporary sibling,
with the permissions the umask gives, then renamed into place.

Reading accepts plain LoRA adapters of decoder-layer projections; PEFT features that change the
math (DoRA, rsLoRA's scaling, per-module ranks, trained biases, modules_to_save, ...) are refused
by name, since te-llama's layers would silently compute something else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .hf_checkpoint import _check_safetensors, follow_umask, make_staging_dir, removed_on_failure, replace_directory
from .lora import TARGETS, LoraError, LoraSpec, adapter_parameters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Fields whose non-default values mean math te-llama's adapters do not do.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                "target_parameters": None, "trainable_token_indices": None, "layer_replication": None}


def adapter_config(lora: LoraSpec, base_model: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig fields for these adapters (the others keep PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": int(lora.alpha) if lora.alpha.is_integer() else lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, lora: LoraSpec,
                      base_model: str | None, tokenizer: Any = None) -> Path:
    """Write a PEFT adapter folder from `tensors` (PEFT keys, `te_llama.model.lora.adapter_tensors`)."""
    path = Path(path)
    if not tensors:
        raise LoraError("no adapter weights to save: the model has no LoRA adapters")
    staging = make_staging_dir(path.parent, f".{path.name}.tmp-")
    kept = f"The adapter already at {path} is intact." if path.exists() else f"Nothing was written to {path}."
    with removed_on_failure(staging, f"the PEFT adapter {path}", kept):
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in sorted(tensors.items())},
                  str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base_model), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        follow_umask(staging)
        replace_directory(staging, path)
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraSpec, str | None]:
    """The LoRA settings of a PEFT adapter folder, and the base model it names (`--lora-adapter`)."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise LoraError(f"--lora-adapter {path}: no {ADAPTER_CONFIG} there; pass a PEFT LoRA adapter folder "
                        "(adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes)")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise LoraError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise LoraError(f"{file}: peft_type {found!r}; te-llama continues LoRA adapters only (peft_type LORA)")
    changed = sorted(k for k, default in _UNSUPPORTED.items() if config.get(k, default) not in (default, None, {}, []))
    if changed:
        raise LoraError(f"{file} uses {', '.join(f'{k}={config[k]!r}' for k in changed)}: te-llama's adapters are plain "
                        "LoRA (one rank and alpha for all, no bias, scaling alpha / r); train a new adapter instead")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
        raise LoraError(f"{file}: target_modules {targets!r}; te-llama's adapters target decoder projections by "
                        f"name, a list from {list(TARGETS)}")
    try:
        lora = LoraSpec(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                        tuple(t for t in TARGETS if t in targets))  # te-llama's one order
    except (KeyError, TypeError, ValueError) as exc:
        raise LoraError(f"{file}: no usable r / lora_alpha ({exc})") from exc
    return lora, config.get("base_model_name_or_path")


def load_peft_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a PEFT adapter's weights into the model's adapters: every key present, every shape equal."""
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise LoraError(f"--lora-adapter {path}: no {ADAPTER_WEIGHTS} there (adapters saved as .bin are not read: "
                        "re-save with PeftModel.save_pretrained(safe_serialization=True))")
    tensors = load_file(str(_check_safetensors(file)))
    params = adapter_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise LoraError(f"{file}: missing {missing[:4] or 'none'}{' ...' if len(missing) > 4 else ''}, unexpected "
                        f"{unexpected[:4] or 'none'}{' ...' if len(unexpected) > 4 else ''}; the adapter was trained "
                        "for another model, other targets or another rank")
    with torch.no_grad():
        for key, param in params.items():
            if tensors[key].shape != param.shape:
                raise LoraError(f"{file}: {key} has shape {tuple(tensors[key].shape)}, the model's adapter "
                                f"{tuple(param.shape)}; the adapter was trained for another model")
            param.copy_(tensors[key])
