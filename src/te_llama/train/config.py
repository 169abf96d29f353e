"""Finetune configuration: a dataclass with a docstring per field, YAML/TOML files, flags on top.

Precedence: dataclass defaults < embedded-default preset (when no --model is given) < config
file < command-line flags. The resolved config is saved with every run (run_config.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import tomllib
import yaml

from ..errors import TeLlamaError

Backend = Literal["auto", "te", "reference", "hf"]
Precision = Literal["auto", "fp32", "bf16", "fp8", "fp8-delayed", "fp8-current", "fp8-block", "mxfp8",
                    "fp8-delayed-fastacc", "fp8-current-fastacc"]
ParamDtype = Literal["auto", "float32", "bfloat16"]
LongRows = Literal["truncate", "drop", "fail"]
OnBadRows = Literal["fail", "skip"]
Schedule = Literal["cosine", "linear", "constant"]
Parallel = Literal["ddp", "fsdp2"]
LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                     "gate_up_proj"]
LoraBase = Literal["bf16", "fp8"]
FP8_BASE_PRECISIONS = ("fp8", "fp8-block", "fp8-current", "fp8-current-fastacc", "mxfp8")
"""FP8 recipes whose weight scales come from the weights themselves, which a base quantized once at load
needs (delayed scaling's come from an amax history the frozen weights never build: its scale 1 would
flush most weights to zero)."""


class ConfigError(TeLlamaError, ValueError):
    """An option has a value te-llama cannot use (the option, the value and the allowed range named)."""


@dataclass
class FinetuneConfig:
    """Every finetune option, in the groups of `GROUPS` (the CLI's --help sections, YAML sections)."""

    # ---- model
    model: str | None = None
    """HF checkpoint folder (or a Hub id, downloaded once); None = the tiny built-in model and tokenizer."""
    backend: Backend = "auto"
    """"te", "reference" (pure-PyTorch twin, any device), "hf" (transformers as is, the baseline), or
    "auto" (TE when CUDA and TE are present, else reference)."""
    param_dtype: ParamDtype = "auto"
    """Dtype the weights are stored and updated in: "float32" or "bfloat16"; auto = bf16 on GPU, fp32 on CPU."""
    fuse_qkv: bool = True
    """Keep Q/K/V as one TE parameter (one GEMM)."""
    # ---- data
    data: str | None = None
    """JSONL/JSON/Parquet/CSV file, a save_to_disk folder, or a hub name; None = bundled sample."""
    data_split: str = "train"
    """Split to train on, for datasets with several (a save_to_disk DatasetDict, a hub dataset)."""
    text_field: str = "text"
    """Column with the plain text, for non-chat data."""
    assistant_only_loss: bool = True
    """For chat data: train only on assistant tokens."""
    max_seq_len: int = 2048
    """Examples longer than this are handled by long_rows."""
    long_rows: LongRows = "truncate"
    """Examples over max_seq_len: "truncate", "drop" or "fail"."""
    on_bad_rows: OnBadRows = "fail"
    """Bad rows (malformed JSON, missing text, unknown chat roles...): "fail" (nothing silently lost) or
    "skip" (counted)."""
    eval_fraction: float = 0.05
    """Share of examples held out for evaluation (0 = no eval)."""
    packing: bool = True
    """Pack examples into rows (no padding, no cross-example attention); False = pad each batch."""
    cache_dir: str | None = None
    """Where tokenized data is cached; None = ~/.cache/te-llama."""
    # ---- optimization
    learning_rate: float = 2e-5
    """AdamW's peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up linearly."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule after warm-up: "cosine", "linear" or "constant"."""
    max_grad_norm: float = 0.0
    """Gradient clipping by the global norm (0 = off, the default: finetuning a pretrained model
    measured the same eval loss without it, and it lets AdamW overlap backward; 1.0 for training
    from scratch or high learning rates, where it matters)."""
    batch_size: int | Literal["auto"] = "auto"
    """Examples per micro-batch (padding), or the token budget batch_size * max_seq_len (packing). auto: 8 per
    optimizer step, split into 2, 4 or 8 micro-batches (with gradient accumulation) when a probe at the start
    finds they do not fit the GPU (or --max-memory) together; on a CPU and under FSDP2, 8."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seeds the model init (built-in model) and the data order (the eval split stays fixed)."""
    max_steps: int | None = None
    """Optimizer steps; None = run `epochs` epochs."""
    epochs: int = 1
    """Passes over the training data, when max_steps is not given."""
    stop_after_steps: int | None = None
    """Stop (with a checkpoint) after this many steps of this run, schedule unchanged; resume later."""
    # ---- speed
    precision: Precision = "auto"
    """"fp32", "bf16", "fp8" (= fp8-block), "fp8-delayed", "fp8-current", "fp8-block", "mxfp8",
    "fp8-delayed-fastacc", "fp8-current-fastacc" (fast FP8 accumulation in the backward GEMMs too);
    auto = fp8-delayed-fastacc with TE on one FP8 GPU (Hopper, Ada or newer), else bf16 on GPU, fp32 on CPU."""
    cuda_graphs: bool | None = None
    """Replay the TE layers as CUDA graphs for the packed token budget (rows padded to it). Unset
    (auto): wherever they run (backend te, packing, not FSDP2, no activation checkpointing);
    --cuda-graphs where they cannot is refused with the reason."""
    overlap_optimizer: bool | None = None
    """Update each decoder layer during backward on a second CUDA stream, overlapping AdamW with the
    backward's GEMMs. Unset (auto): wherever that equals AdamW after backward (grad_accum 1, no
    clipping, one process); explicit where it cannot is refused."""
    fused_loss: bool | None = None
    """lm_head + cross-entropy without FP32 logits (less memory, fewer passes over the vocabulary).
    Unset (auto): backends te/reference (also under DDP and FSDP2); explicit where it cannot is refused."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward: less memory, about a third more compute."""
    activation_checkpointing_layers: int | None = None
    """With --activation-checkpointing: recompute only the first N decoder layers (unset: all of them).
    Each layer left out keeps its activations and skips its recompute: at Llama-3-8B with 8,192 tokens
    per step on an H200, about 1.3 GiB more at the peak and 4.5 ms less per step (docs/PERFORMANCE.md)."""
    max_memory: float | None = None
    """GiB of GPU memory this run may use (torch's per-process limit), e.g. 75 to check on a larger GPU
    that a run fits an 80 GB one; unset: the whole GPU."""
    parallel: Parallel = "ddp"
    """With several processes: "ddp" (replicas, through accelerate) or "fsdp2" (torch FSDP2, sharded;
    needs torchrun/accelerate launch)."""
    # ---- lora
    lora_rank: int | None = None
    """Train LoRA adapters of this rank beside the frozen base weights (PEFT's LoRA; output_dir/final is a
    PEFT adapter). Unset: a full finetune."""
    lora_alpha: float | None = None
    """The adapters' output is scaled by alpha / rank (PEFT's convention); unset = 2 x rank."""
    lora_dropout: float | None = None
    """Dropout on the adapters' input (PEFT's lora_dropout), 0 <= p < 1; unset = 0 (or the --lora-adapter's)."""
    lora_targets: list[LoraTarget] | None = None
    """HF projections that get adapters; unset = every linear of the decoder layer (q_proj k_proj v_proj o_proj
    gate_proj up_proj down_proj; Phi-3: qkv_proj o_proj gate_up_proj down_proj)."""
    lora_base: LoraBase = "bf16"
    """The frozen base weights: "bf16" (as loaded, in --param-dtype) or "fp8" (TE FP8 weights, FP8 GEMMs, no
    per-step weight casts; backend te on an FP8 GPU, an FP8 precision whose scales come from the weights)."""
    lora_adapter: str | None = None
    """Continue training this PEFT LoRA adapter folder (its rank, alpha and targets; conflicting flags refused)."""
    merge_lora: bool = False
    """Also export the model with the adapters merged into its weights: a plain HF checkpoint in
    output_dir/final-merged."""
    # ---- checkpointing
    output_dir: str = "runs/te-llama"
    """Checkpoints, metrics, plot and the exported HF model (output_dir/final)."""
    save_every: int = 500
    """Training checkpoint every N steps and at the end (0 = none: only the final HF export)."""
    save_every_minutes: float = 60.0
    """Also a checkpoint once this many minutes passed since the last one, so a crash loses at most
    this much work whatever the step time (0 = by steps only; save_every 0 turns both off)."""
    keep_last: int = 2
    """Checkpoints kept (older ones deleted after a newer one is complete)."""
    resume: bool = False
    """Continue the run in output_dir from its latest checkpoint."""
    overwrite: bool = False
    """Replace a finished or checkpointed te-llama run in output_dir (only te-llama's own files are
    deleted; a folder holding anything else is refused)."""
    # ---- logging
    eval_every: int = 100
    """Held-out eval loss every N steps and at the end."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""

    def __post_init__(self) -> None:
        """Coerce each value to its field's type and check its range: bad values fail at parse time,
        before a model is loaded or a folder created, with the option and the fix named."""
        hints = get_type_hints(type(self))
        for field in fields(self):
            setattr(self, field.name, _coerce(field.name, getattr(self, field.name), hints[field.name]))
        for name, (low, high, note) in RANGES.items():
            value = getattr(self, name)
            if value is None or isinstance(value, str):  # None or a named setting such as "auto"
                continue
            if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
                raise ConfigError(f"{_option(name)} {value!r} is out of range: {note}")
        self._check_lora()
        if self.activation_checkpointing_layers is not None and not self.activation_checkpointing:
            raise ConfigError(f"{_option('activation_checkpointing_layers')} says how many layers activation "
                              "checkpointing recomputes: add --activation-checkpointing (or drop "
                              "activation_checkpointing_layers from the config file)")

    @property
    def lora(self) -> bool:
        """LoRA: adapters train beside a frozen base."""
        return self.lora_rank is not None or self.lora_adapter is not None

    def _check_lora(self) -> None:
        """LoRA options that cannot work whatever the machine, refused with the fix."""
        if not self.lora:
            given = [n for n, unset in (("lora_alpha", None), ("lora_dropout", None), ("lora_targets", None),
                                        ("lora_base", "bf16"), ("merge_lora", False)) if getattr(self, n) != unset]
            if given:
                raise ConfigError(f"{_option(given[0])} is a LoRA option: pass --lora-rank R (or --lora-adapter "
                                  "PATH) for a LoRA finetune, or leave it out for a full finetune")
            return
        if self.lora_base != "fp8":
            return
        fix = "; or use --lora-base bf16"
        if self.backend in ("reference", "hf"):
            raise ConfigError(f"--lora-base fp8 needs --backend te (Transformer Engine's FP8 weights and GEMMs), not "
                              f"{self.backend}{fix}")
        if not self.fuse_qkv:
            raise ConfigError(f"--lora-base fp8 needs --fuse-qkv: TE cannot split one FP8 weight into separate Q/K/V "
                              f"parameters{fix}")
        if self.precision != "auto" and self.precision not in FP8_BASE_PRECISIONS:
            why = ("delayed scaling takes a weight's scale from an amax history that weights quantized once at load "
                   "never have" if self.precision.startswith("fp8-delayed") else "the FP8 base runs FP8 GEMMs")
            raise ConfigError(f"--lora-base fp8 with --precision {self.precision}: {why}; use --precision "
                              f"{' / '.join(FP8_BASE_PRECISIONS)} (or leave it auto){fix}")


GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model", "backend", "param_dtype", "fuse_qkv"),
    "data": ("data", "data_split", "text_field", "assistant_only_loss", "max_seq_len", "long_rows", "on_bad_rows",
             "eval_fraction", "packing", "cache_dir"),
    "optimization": ("learning_rate", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm", "batch_size",
                     "grad_accum", "seed", "max_steps", "epochs", "stop_after_steps"),
    "speed": ("precision", "cuda_graphs", "overlap_optimizer", "fused_loss",
              "activation_checkpointing", "activation_checkpointing_layers", "max_memory", "parallel"),
    "lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_base", "lora_adapter", "merge_lora"),
    "checkpointing": ("output_dir", "save_every", "save_every_minutes", "keep_last", "resume", "overwrite"),
    "logging": ("eval_every", "tensorboard"),
}
"""The option groups, in order: --help sections and the sections a YAML/TOML config may use."""
SECTION_ALIASES = {("model", "path"): "model"}
"""In a config file's `model:` section, the checkpoint folder is `path:` (`model: {model: ...}` reads badly)."""


RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "max_seq_len": (1, None, "it must be at least 1 token"),
    "batch_size": (1, None, "it must be at least 1"),
    "grad_accum": (1, None, "it must be at least 1 micro-batch per step"),
    "learning_rate": (1e-12, None, "it must be above 0 (e.g. 2e-5 for a full finetune)"),
    "weight_decay": (0, None, "it must be 0 or more"),
    "warmup_ratio": (0, 1, "it is a share of the steps, from 0 to 1 (e.g. 0.03)"),
    "eval_fraction": (0, 0.9, "it is the share of examples held out, from 0 (no eval) to 0.9"),
    "max_grad_norm": (0, None, "it must be 0 (no clipping) or more"),
    "max_steps": (1, None, "it must be at least 1 (or leave it out to run --epochs epochs)"),
    "epochs": (1, None, "it must be at least 1"),
    "stop_after_steps": (1, None, "it must be at least 1 (or leave it out to run to the end)"),
    "eval_every": (1, None, "it must be at least 1 (--eval-fraction 0 turns eval off)"),
    "save_every": (0, None, "it must be 0 (no step-based checkpoints) or more"),
    "save_every_minutes": (0, None, "it must be 0 (off) or more"),
    "keep_last": (1, None, "it must keep at least 1 checkpoint"),
    "max_memory": (1, None, "it is the GiB this run may use on the GPU, e.g. 75"),
    "activation_checkpointing_layers": (1, None, "it is how many decoder layers to recompute, at least 1 (leave "
                                                 "it out to recompute every layer)"),
    "lora_rank": (1, None, "it must be at least 1, e.g. 16 (leave --lora-rank out for a full finetune)"),
    "lora_alpha": (1e-12, None, "it must be above 0 (unset: 2 x --lora-rank)"),
    "lora_dropout": (0, math.nextafter(1.0, 0.0), "it is the probability of dropping an adapter input, from 0 up "
                                                  "to (not including) 1"),
}
"""Allowed range (inclusive) of each numeric option, and what to tell the user."""


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')} ({name})"


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """`value` as the field's type: YAML gives '1e-5' as a string and 8 where 8.0 is meant."""
    args = get_args(kind)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{_option(name)} needs a value")
    listed = next((a for a in args if get_origin(a) is list), None)
    if listed is not None:
        return _coerce_list(name, value, get_args(get_args(listed)[0]))
    named = next((a for a in args if get_origin(a) is Literal), None)  # e.g. int | Literal["auto"]
    if named is not None and value in get_args(named):
        return value
    if get_origin(kind) is Literal:
        if value not in args:
            raise ConfigError(f"{_option(name)} {value!r} is not one of: {', '.join(map(str, args))}")
        return value
    base = next(t for t in (bool, int, float, str) if t is kind or t in args)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_option(name)} {value!r} must be true or false")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{_option(name)} {value!r} must be a string")
    if isinstance(value, bool):
        raise ConfigError(f"{_option(name)} {value!r} must be a number")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        named_too = f" (or {' / '.join(map(str, get_args(named)))})" if named is not None else ""
        raise ConfigError(f"{_option(name)} {value!r} is not a number{named_too}") from None
    if not isinstance(number, (int, float)):
        raise ConfigError(f"{_option(name)} {value!r} is not a number")
    if base is float:
        return float(number)
    if float(number) != int(number):
        raise ConfigError(f"{_option(name)} {value!r} must be a whole number")
    return int(number)


def _coerce_list(name: str, value: Any, choices: tuple[str, ...]) -> list[str]:
    """A list of names from a YAML list, or a string of names separated by spaces or commas."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{_option(name)} {value!r} must be a list of: {', '.join(choices)}")
    for item in value:
        if item not in choices:
            raise ConfigError(f"{_option(name)} {item!r} is not one of: {', '.join(choices)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{_option(name)} {list(value)!r} names a target twice")
    return list(value)


# The embedded default: tiny model, bundled data, done in well under a minute on a CPU.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/te-llama-tiny", "max_seq_len": 128, "learning_rate": 3e-3,
    "max_steps": 60, "eval_every": 20, "save_every": 30, "warmup_ratio": 0.1, "eval_fraction": 0.1,
}
FIELD_NAMES = {f.name for f in fields(FinetuneConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    values = values.get("finetune", values) if isinstance(values, dict) else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, dict):  # a section: its options by name
            for name, option in value.items():
                field_name = SECTION_ALIASES.get((key, name), name)
                if field_name not in GROUPS[key]:
                    home = next((g for g, names in GROUPS.items() if name in names), None)
                    raise ConfigError(f"{path}: section {key!r} has no option {name!r}"
                                      + (f"; it belongs in section {home!r}" if home else
                                         f"; its options: {', '.join(GROUPS[key])}"))
                flat = _add_once(flat, field_name, option, path)
        else:
            flat = _add_once(flat, key, value, path)
    unknown = sorted(set(flat) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; known: {sorted(FIELD_NAMES)}")
    return flat


def _add_once(values: dict[str, Any], name: str, value: Any, path: Path) -> dict[str, Any]:
    if name in values:
        raise ConfigError(f"{path}: option {name!r} is given twice")
    return values | {name: value}


def resolve_config(file: str | Path | None = None, **flags: Any) -> FinetuneConfig:
    """Defaults < built-in preset (no model given) < file < flags (None flags are 'not given')."""
    from_file = read_config_file(file) if file else {}
    given = {k: v for k, v in flags.items() if v is not None}
    unknown = sorted(set(given) - FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}")
    values: dict[str, Any] = {}
    if (given.get("model") or from_file.get("model")) is None:
        values |= BUILTIN_DEFAULTS
    return FinetuneConfig(**(values | from_file | given))


def save_config(config: FinetuneConfig, path: Path, world_size: int = 1,
                fingerprint: dict[str, str] | None = None, resolved: dict[str, str] | None = None) -> None:
    """The config, the number of processes the run started with, its data fingerprint, and what
    its "auto" settings resolved to (backend, precision, param dtype) on the machine it started on."""
    extra = {"world_size": world_size, "eval_split_seed": EVAL_SPLIT_SEED} | \
        ({"fingerprint": fingerprint} if fingerprint else {}) | ({"resolved": resolved} if resolved else {})
    path.write_text(json.dumps(asdict(config) | extra, indent=2, sort_keys=True) + "\n")


SAVED_EXTRAS = ("world_size", "eval_split_seed", "fingerprint", "resolved")
"""What run_config.json holds beside the options."""
EVAL_SPLIT_SEED = 0
"""The held-out split does not move with --seed: runs with different seeds are judged on the same
rows. (Runs whose run_config.json does not record it split by their --seed.)"""

# Options that may differ between a run and its resumption without changing its results.
RESUME_FREE_FIELDS = {"resume", "overwrite", "stop_after_steps", "cache_dir", "tensorboard", "output_dir",
                      "eval_every", "save_every", "save_every_minutes", "keep_last", "merge_lora",
                      "max_memory"}
