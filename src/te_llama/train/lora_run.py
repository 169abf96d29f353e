"""A LoRA finetune's settings and exports: the adapters' spec from the options (or from the adapter being
continued), what an FP8 base needs, PEFT for backend 'hf', and the PEFT adapter (and merged model) at the end.

Everything here that can fail reads configs only, so a bad LoRA setting fails before any loading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from ..availability import te_import_error
from ..errors import BackendUnavailableError
from ..model.hf_checkpoint import save_pretrained
from ..model.lora import TARGETS, LoraSpec, adapter_tensors, check_targets, family_targets
from ..model.peft_adapter import read_adapter_config, save_peft_adapter
from ..model.presets import preset_config
from ..model.spec import ArchitectureSpec
from .checkpoints import EXPORT_NAME, MERGED_EXPORT_NAME
from .config import FP8_BASE_PRECISIONS, ConfigError, FinetuneConfig

logger = logging.getLogger(__name__)


def model_config(model_path: Path | None) -> Any:
    """The HF config of the model to train (the built-in model's without a path); no weights read."""
    return AutoConfig.from_pretrained(model_path, trust_remote_code=False) if model_path else preset_config("tiny-llama")


def resolve_lora(config: FinetuneConfig, backend: str, hf_config: Any) -> LoraSpec | None:
    """The adapters of this run (None: a full finetune), checked against the model's family.

    With --lora-adapter, rank, alpha and targets are the adapter's (flags that differ are refused); its
    dropout too, unless --lora-dropout is given. Default alpha: 2 x rank; default targets: every linear.
    """
    if not config.lora:
        return None
    if backend == "hf":
        require_peft()
    spec = ArchitectureSpec.from_hf_config(hf_config)
    rank, alpha, dropout, targets = config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets
    if config.lora_adapter:
        saved, base = read_adapter_config(config.lora_adapter)
        asked = {"--lora-rank": (rank, saved.rank), "--lora-alpha": (alpha, saved.alpha),
                 "--lora-targets": (sorted(targets) if targets else None, sorted(saved.targets))}
        conflicts = [f"{flag} {given}" for flag, (given, theirs) in asked.items() if given not in (None, theirs)]
        if conflicts:
            raise ConfigError(f"--lora-adapter {config.lora_adapter} was trained with r {saved.rank}, alpha "
                              f"{saved.alpha:g}, targets {' '.join(sorted(saved.targets))}; {', '.join(conflicts)} "
                              "conflict with it: leave them out (they come from its adapter_config.json)")
        logger.info("continuing the LoRA adapter %s (trained on %s)", config.lora_adapter, base or "an unnamed base")
        rank, alpha, targets = saved.rank, saved.alpha, list(saved.targets)
        dropout = saved.dropout if dropout is None else dropout
    chosen = tuple(targets) if targets else family_targets(spec)
    check_targets(chosen, spec)
    return LoraSpec(rank, alpha if alpha is not None else 2.0 * rank, dropout or 0.0,
                    tuple(t for t in TARGETS if t in chosen))  # one order, whatever order they were given in


def fp8_base_precision(backend: str) -> tuple[str, str]:
    """What `--precision auto` means with an FP8 base: per-tensor current scaling with fast accumulation.
    Measured at Llama-3-8B 1x8192 on an H200: 468 ms/step against block scaling's 498, both within
    0.1% of transformers + PEFT's eval loss on the quality benchmark."""
    check_fp8_base_backend(backend)
    return "fp8-current-fastacc", "FP8 base: per-tensor scales from the weights, fast accumulation"


def check_fp8_base_backend(backend: str) -> None:
    if backend != "te":
        why = te_import_error() or ("no CUDA GPU" if not torch.cuda.is_available() else f"backend {backend}")
        raise BackendUnavailableError(f"--lora-base fp8 needs backend te (Transformer Engine's FP8 weights and "
                                      f"GEMMs on an FP8 GPU); here: {why}. Use --lora-base bf16")


def check_fp8_base(config: FinetuneConfig, backend: str, precision: str) -> None:
    """Refuse an FP8 base where it cannot run: no TE, or a precision whose scales it cannot use."""
    if not (config.lora and config.lora_base == "fp8"):
        return
    check_fp8_base_backend(backend)
    if precision not in FP8_BASE_PRECISIONS:
        raise ConfigError(f"--lora-base fp8 runs FP8 GEMMs with scales from the weights: --precision {precision} "
                          f"cannot; use {' / '.join(FP8_BASE_PRECISIONS)}, or --lora-base bf16")


def fp8_base_recipe(config: FinetuneConfig, precision: str) -> Any:
    """The TE recipe the base weights are quantized with (the run's own FP8 recipe), or None."""
    if not (config.lora and config.lora_base == "fp8"):
        return None
    from ..precision import make_recipe

    return make_recipe(precision)


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"backend hf with LoRA runs transformers with PEFT, which is not installed "
                                      f"({exc}): pip install 'peft>=0.15'") from exc


def peft_model(model: Any, lora: LoraSpec, adapter: str | None = None) -> Any:
    """Backend 'hf' with LoRA: the transformers model wrapped by PEFT itself (the baseline te-llama's
    LoRA layers are measured against): new adapters, or the --lora-adapter to continue."""
    import peft

    if adapter:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        for module in model.modules():  # --lora-dropout given for the continued adapter
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_dropout:
                module.lora_dropout["default"] = torch.nn.Dropout(lora.dropout) if lora.dropout else \
                    torch.nn.Identity()
        return model
    return peft.get_peft_model(model, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                      target_modules=list(lora.targets), task_type="CAUSAL_LM"))


def export_lora(model: Any, tokenizer: Any, out: Path, config: FinetuneConfig, lora: LoraSpec, backend: str,
                state_dict: dict | None = None) -> Path:
    """output_dir/final as a PEFT adapter folder (with the tokenizer); with --merge-lora also the merged
    model as a plain HF checkpoint in output_dir/final-merged. `state_dict`: gathered from FSDP2 shards."""
    final = out / EXPORT_NAME
    if backend == "hf":
        model.peft_config["default"].base_model_name_or_path = config.model
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if config.merge_lora:
            merged = model.merge_and_unload()
            merged.save_pretrained(out / MERGED_EXPORT_NAME)
            tokenizer.save_pretrained(out / MERGED_EXPORT_NAME)
        return final
    save_peft_adapter(adapter_tensors(state_dict if state_dict is not None else model.state_dict()), final, lora,
                      config.model, tokenizer)
    if config.merge_lora:
        save_pretrained(model, out / MERGED_EXPORT_NAME, tokenizer=tokenizer, state_dict=state_dict)
    return final
