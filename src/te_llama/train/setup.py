"""Setting a run up: what 'auto' means on this machine, and the model and tokenizer to train.

Every check here reads configs only, so bad settings fail before the slow loading starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..availability import te_available
from ..model.builtin import builtin_model, builtin_tokenizer
from ..model.convert import convert, decoder_layers
from ..model.hf_checkpoint import from_pretrained
from ..model.lora import LoraSpec
from ..model.peft_adapter import load_peft_adapter
from ..precision import FP8_PRECISIONS, auto_precision, check_precision_available
from .config import ConfigError, FinetuneConfig
from .data import DataError
from .gpu_memory import limit_memory, prefer_expandable_segments
from .lora_run import check_fp8_base, fp8_base_precision, fp8_base_recipe, model_config, peft_model, resolve_lora
from .step import Runtime

logger = logging.getLogger(__name__)


def resolve_runtime(config: FinetuneConfig) -> Runtime:
    """'auto' resolved for this machine; combinations that cannot run here refused with the fix."""
    prefer_expandable_segments(config.backend)
    cuda = torch.cuda.is_available()
    backend = config.backend if config.backend != "auto" else ("te" if cuda and te_available() else "reference")
    precision = config.precision
    fp8_base = config.lora and config.lora_base == "fp8"
    if precision == "auto":
        precision, why = fp8_base_precision(backend) if fp8_base else \
            auto_precision(cuda, backend, fsdp2=config.parallel == "fsdp2")
        logger.info("precision auto: %s (%s)", precision, why)
    if precision in FP8_PRECISIONS and backend != "te":
        raise ConfigError(f"--precision {precision} needs --backend te (FP8 GEMMs are Transformer Engine's)")
    check_fp8_base(config, backend, precision)
    check_precision_available(precision)
    dtype_name = config.param_dtype if config.param_dtype != "auto" else ("bfloat16" if cuda else "float32")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Runtime(device, backend, precision, getattr(torch, dtype_name), limit_memory(device, config.max_memory))


def check_model_limits(config: FinetuneConfig, model_path: Path | None) -> None:
    """Refuse --max-seq-len past the positions the model was trained for, and more recomputed layers than
    it has (read from its config only)."""
    hf_config = model_config(model_path)
    check_recomputed_layers(config, hf_config)
    limit = getattr(hf_config, "max_position_embeddings", None)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic" or not limit or config.max_seq_len <= limit:
        return  # dynamic NTK scaling is meant to run past the trained length
    raise ConfigError(f"--max-seq-len {config.max_seq_len} is above the model's max_position_embeddings {limit} "
                      f"({model_path or 'built-in model'}): it was never trained on positions past it; "
                      f"use --max-seq-len {limit} or less")


def check_recomputed_layers(config: FinetuneConfig, hf_config: Any) -> None:
    """Refuse --activation-checkpointing-layers above the model's layer count (finetune and bench alike)."""
    layers = getattr(hf_config, "num_hidden_layers", None)
    if layers and (config.activation_checkpointing_layers or 0) > layers:
        raise ConfigError(f"--activation-checkpointing-layers {config.activation_checkpointing_layers}: the model "
                          f"has {layers} decoder layers; use {layers} or less (or leave it out: every layer)")


def load_model_and_tokenizer(config: FinetuneConfig, runtime: Runtime, model_path: Path | None = None
                             ) -> tuple[Any, Any]:
    """The model (converted unless backend 'hf'; with LoRA adapters when asked) and its tokenizer; never
    runs code from the checkpoint."""
    lora = resolve_lora(config, runtime.backend, model_config(model_path))
    base_recipe = fp8_base_recipe(config, runtime.precision)
    if model_path is None:
        tokenizer = builtin_tokenizer()
        model = builtin_model(tokenizer, dtype=runtime.param_dtype, seed=config.seed).to(runtime.device)
        if runtime.backend != "hf":
            model = convert(model, backend=runtime.backend, fuse_qkv=config.fuse_qkv, lora=lora,
                            base_recipe=base_recipe)
    elif runtime.backend == "hf":  # the baseline: transformers as is (SDPA attention)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=runtime.param_dtype,
                                                     trust_remote_code=False).to(runtime.device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        model = from_pretrained(model_path, backend=runtime.backend, torch_dtype=runtime.param_dtype,
                                fuse_qkv=config.fuse_qkv, device=runtime.device, lora=lora, base_recipe=base_recipe)
    if lora is not None:
        model = with_adapters(model, config, runtime, lora)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token "
                            "(padding mode needs one) or use --packing")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using eos %r (pad positions carry no loss)", tokenizer.eos_token)
    return prepare_for_training(model, config, runtime), tokenizer


def with_adapters(model: Any, config: FinetuneConfig, runtime: Runtime, lora: LoraSpec) -> Any:
    """te-llama's LoRA layers loaded from --lora-adapter when given; backend 'hf': PEFT's own."""
    if runtime.backend == "hf":
        model = peft_model(model, lora, config.lora_adapter)
    elif config.lora_adapter:
        load_peft_adapter(model, config.lora_adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: rank %d, alpha %g, dropout %g, targets %s, base %s: %s trainable parameters (%.2f%% of %s)",
                lora.rank, lora.alpha, lora.dropout, " ".join(lora.targets), config.lora_base, f"{trainable:,}",
                100 * trainable / total, f"{total:,}")
    return model


def prepare_for_training(model: Any, config: FinetuneConfig, runtime: Runtime) -> Any:
    """The run's layer options on a loaded model (activation checkpointing of all or the first N decoder
    layers), in training mode."""
    if config.activation_checkpointing:  # renamed in newer transformers; same switch
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = decoder_layers(model)
        for layer in layers[config.activation_checkpointing_layers or len(layers):]:
            layer.gradient_checkpointing = False  # transformers' per-layer switch: this one runs plainly
        if runtime.backend == "te":
            from ..model.layers.te_decoder import recompute_with_te_checkpoint

            recompute_with_te_checkpoint(layers)
    return model.train()
