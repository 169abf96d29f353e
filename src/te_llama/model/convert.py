"""Swap the decoder layers of an HF `*ForCausalLM` for TE-layout layers, by instance.

The HF model object stays what the user has (embeddings, final norm, lm_head, loss,
`generate`, accelerate hooks); only `model.model.layers[i]` change, one at a time, so the
peak memory is the model plus one layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import WeightMappingError
from .layers import BACKENDS, TOKEN_MULTIPLE, build_decoder_layer, require_te
from .layers.hf_adapter import ModelContext
from .lora import LoraSpec, check_targets, freeze_base, is_adapter
from .mapping import hf_layer_to_te, renamed, te_zero_biases
from .spec import ArchitectureSpec

CONVERSION_ATTR = "te_llama_conversion"


@dataclass(frozen=True)
class Conversion:
    """Recorded on the converted model so `save_pretrained` can map its weights back."""

    spec: ArchitectureSpec
    backend: str
    fuse_qkv: bool
    use_cache: bool
    """The config's original `use_cache`, restored in exported checkpoints."""
    generation_use_cache: bool | None = None
    """The generation config's original `use_cache` (None: the model has none)."""
    lora: LoraSpec | None = None
    """The decoder layers carry these LoRA adapters; everything else is frozen."""
    fp8_base: bool = False
    """The LoRA layers' frozen GEMM weights are TE FP8 tensors."""


def conversion_of(model: nn.Module) -> Conversion:
    info = getattr(model, CONVERSION_ATTR, None)
    if info is None:
        raise ValueError("this model was not converted by te_llama.model.convert / te_llama.from_pretrained")
    return info


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers` of a Llama-family *ForCausalLM (or the layers of a bare *Model; through a PEFT
    wrapper, those of the model it wraps)."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `model.layers`; expected a Llama-family *ForCausalLM")
    return layers


def release_weight_transposes(model: nn.Module) -> None:
    """After a backward: free the transposed FP8 copies an FP8 LoRA base's weights got for it, so the frozen
    base stays at one byte per weight between steps (`te_llama.model.layers.te_lora`); no-op otherwise."""
    for layer in decoder_layers(model):
        release = getattr(layer, "release_weight_transposes", None)
        if release is not None:
            release()


def load_layer_weights(layer: nn.Module, tensors: Mapping[str, torch.Tensor], spec: ArchitectureSpec,
                       fuse_qkv: bool, where: str = "") -> None:
    """Copy TE-layout tensors into a layer's base parameters, strictly; freeze TE-only zero biases.

    A LoRA layer's adapters are not part of the base (they start as new adapters do, or load from one)."""
    renames = getattr(layer, "PARAMETER_RENAMES", {})
    tensors = renamed(tensors, renames)
    params = {name: p for name, p in layer.named_parameters() if not is_adapter(name)}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise WeightMappingError(f"{where}: missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    with torch.no_grad():
        for name, param in params.items():
            source = tensors[name]
            if source.shape != param.shape:
                raise WeightMappingError(
                    f"{where}{name}: shape {tuple(source.shape)} given, layer has {tuple(param.shape)}"
                )
            param.copy_(source)  # into a TE FP8 weight (an FP8 LoRA base): quantizes
    for name in te_zero_biases(spec, fuse_qkv):
        params[renames.get(name, name)].requires_grad_(False)


def te_layout_tensors(layer: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's own base tensors (its state dict, adapters dropped) under TE TransformerLayer names, in
    high precision: the inverse of what `load_layer_weights` does to the names."""
    back = {own: te for te, own in getattr(layer, "PARAMETER_RENAMES", {}).items()}
    return {back.get(name, name): dequantized(tensor) for name, tensor in tensors.items() if not is_adapter(name)}


def dequantized(tensor: torch.Tensor) -> torch.Tensor:
    """A TE quantized tensor (an FP8 LoRA base's weight) as a plain one; any other tensor unchanged."""
    return tensor.dequantize() if type(tensor).__module__.startswith("transformer_engine") else tensor


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "te":
        require_te()


def install_layers(model: nn.Module, backend: str, fuse_qkv: bool,
                   source_tensors=None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, lora: LoraSpec | None = None, base_recipe: Any = None) -> nn.Module:
    """Replace every decoder layer; fill it from `source_tensors(i)` (TE layout) when given.

    Without `device`/`dtype`, each new layer takes those of the layer it replaces. With `lora`, the
    layers carry adapters (new: lora_B zero, so the model computes what it did) and everything else is
    frozen; `base_recipe` (a TE FP8 recipe, backend te) stores their frozen GEMM weights in FP8.
    """
    _check_backend(backend)
    spec = ArchitectureSpec.from_hf_config(model.config)
    if lora is not None:
        check_targets(lora.targets, spec)
    layers = decoder_layers(model)
    if len(layers) != spec.num_layers:
        raise ValueError(f"model has {len(layers)} layers, config says {spec.num_layers}")
    context = ModelContext(model.config, spec, TOKEN_MULTIPLE[backend])
    for index, old in enumerate(layers):
        reference = next(old.parameters())
        new = build_decoder_layer(backend, spec, index, fuse_qkv, device or reference.device,
                                  dtype or reference.dtype, context, lora, base_recipe)
        if source_tensors is not None:
            load_layer_weights(new, source_tensors(index, old), spec, fuse_qkv, where=f"model.layers.{index}.")
        layers[index] = new
        del old
    generation = getattr(model, "generation_config", None)
    setattr(model, CONVERSION_ATTR, Conversion(spec, backend, fuse_qkv, bool(model.config.use_cache),
                                               generation.use_cache if generation is not None else None,
                                               lora, base_recipe is not None))
    model.config.use_cache = False  # our layers keep no KV cache; generate() recomputes instead
    if generation is not None:
        generation.use_cache = False
    if lora is not None:
        freeze_base(model)
    return model


def convert(hf_model: Any, backend: str = "reference", fuse_qkv: bool = False, lora: LoraSpec | None = None,
            base_recipe: Any = None) -> Any:
    """Return `hf_model` itself with its decoder layers replaced by `backend` layers, weights copied.

    backend: "reference" (pure PyTorch, any device) or "te" (Transformer Engine, CUDA).
    fuse_qkv: keep Q/K/V as one TE parameter (TE's `fuse_qkv_params=True`).
    lora: LoRA layers with new adapters, the rest frozen (`te_llama.model.lora`); base_recipe: their
    frozen GEMM weights in FP8 with this TE recipe (backend te; the run's FP8 autocast recipe).
    """
    spec = ArchitectureSpec.from_hf_config(hf_model.config)

    def from_hf(index: int, old: nn.Module) -> dict[str, torch.Tensor]:
        return hf_layer_to_te(old.state_dict(), spec, fuse_qkv, where=f"model.layers.{index}.")

    return install_layers(hf_model, backend, fuse_qkv, source_tensors=from_hf, lora=lora, base_recipe=base_recipe)
