"""Finetune configuration: a dataclass with a docstring per field, YAML/TOML files, flags on top.

Precedence: dataclass defaults < embedded-default preset (when no --model is given) < config
file < command-line flags. The resolved config is saved with every run (run_config.json).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class FinetuneConfig:
    model: str | None = None
    """Local HF checkpoint directory; None = the tiny built-in model and tokenizer."""
    data: str | None = None
    """JSONL/JSON/Parquet/CSV file, a save_to_disk folder, or a hub name; None = bundled sample."""
    output_dir: str = "runs/te-llama"
    """Checkpoints, metrics, plot and the exported HF model (output_dir/final)."""
    backend: str = "auto"
    """"te", "reference", "hf" (transformers as is, the baseline), or "auto" (TE when CUDA and TE are present)."""
    precision: str = "auto"
    """"fp32", "bf16", "fp8" (default recipe), "fp8-delayed", "fp8-current", "fp8-block", "mxfp8",
    "fp8-delayed-fastacc", "fp8-current-fastacc" (fast FP8 accumulation in the backward GEMMs too); auto = bf16 on GPU, fp32 on CPU."""
    param_dtype: str = "auto"
    """Dtype the weights are stored and updated in: "float32" or "bfloat16"; auto = bf16 on GPU (a 7B fits), fp32 on CPU."""
    fuse_qkv: bool = True
    """Keep Q/K/V as one TE parameter (one GEMM)."""
    text_field: str = "text"
    """Column with the plain text, for non-chat data."""
    assistant_only_loss: bool = True
    """For chat data: train only on assistant tokens."""
    max_seq_len: int = 2048
    """Examples longer than this are handled by long_rows."""
    long_rows: str = "truncate"
    """Examples over max_seq_len: "truncate", "drop" or "fail"."""
    on_bad_rows: str = "fail"
    """Malformed JSON lines: "fail" (the default: nothing silently lost) or "skip" (counted)."""
    eval_fraction: float = 0.05
    """Share of examples held out for evaluation (0 = no eval)."""
    packing: bool = True
    """Pack examples into rows (no padding, no cross-example attention); False = pad each batch."""
    batch_size: int = 8
    """Examples per micro-batch (padding), or the token budget batch_size * max_seq_len (packing)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up linearly."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: "cosine", "linear" or "constant"."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    parallel: str = "ddp"
    """With several processes: "ddp" (replicas, through accelerate) or "fsdp2" (torch FSDP2, sharded; needs torchrun/accelerate launch)."""
    cuda_graphs: bool = True
    """Replay the TE layers as CUDA graphs (backend te, packing, one process, no activation checkpointing; otherwise eager, logged). Packed rows are then padded to the token budget."""
    overlap_optimizer: bool = True
    """Update each decoder layer during backward on a second CUDA stream (LayerwiseAdamW), overlapping AdamW with the backward's GEMMs; with CUDA graphs the layers' weight gradients then share two buffers. Only where that equals AdamW after backward: grad_accum 1, max_grad_norm 0, one process, no activation checkpointing (otherwise plain AdamW, logged)."""
    fp8_weight_cache: bool = False
    """FP8 with CUDA graphs and the overlapped optimizer: cast each layer's weights to FP8 right after its update, on the optimizer's stream, instead of in the next forward (te_llama.fp8_weight_cache). Same training; measured no faster on a 7B (docs/SPEED_NOTES.md, change 8), so off by default."""
    fused_loss: bool = True
    """Compute the loss with te_llama.fused_loss: the lm_head GEMM and cross-entropy without FP32 logits (less memory, fewer passes over a 32k-128k vocabulary). Backends te and reference, one process; otherwise transformers' own loss (logged)."""
    bf16_first_layers: int = 0
    """FP8 precisions: run this many first decoder layers in BF16 (most of FP8's slower learning comes from them: docs/SPEED_NOTES.md, change 10)."""
    bf16_last_layers: int = 0
    """FP8 precisions: run this many last decoder layers in BF16."""
    optimizer_kernel: str = "auto"
    """AdamW's update kernel: "torch" (fused AdamW), "triton" (te_llama.triton_adamw: ~25% faster on a 7B; CUDA, not FSDP2), or "auto" (triton where it runs)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward: less memory, about a third more compute."""
    seed: int = 0
    max_steps: int | None = None
    """Optimizer steps; None = run `epochs` epochs."""
    epochs: int = 1
    stop_after_steps: int | None = None
    """Stop (with a checkpoint) after this many steps of this run, schedule unchanged; resume later."""
    eval_every: int = 100
    save_every: int = 500
    """Training checkpoint every N steps and at the end (0 = none: only the final HF export)."""
    keep_last: int = 2
    """Checkpoints kept (older ones deleted after a newer one is complete)."""
    resume: bool = False
    """Continue the run in output_dir from its latest checkpoint."""
    overwrite: bool = False
    """Replace a different run already in output_dir."""
    cache_dir: str | None = None
    """Where tokenized data is cached; None = ~/.cache/te-llama."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""


# The embedded default: tiny model, bundled data, done in well under a minute on a CPU.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/te-llama-tiny", "max_seq_len": 128, "batch_size": 8, "learning_rate": 3e-3,
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
        raise ValueError(f"{path}: expected a mapping of option names to values")
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(FIELD_NAMES)}")
    return values


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


def save_config(config: FinetuneConfig, path: Path, world_size: int = 1) -> None:
    """The resolved config, plus the number of processes the run started with."""
    path.write_text(json.dumps(asdict(config) | {"world_size": world_size}, indent=2, sort_keys=True) + "\n")


# Options that may differ between a run and its resumption without changing its results.
RESUME_FREE_FIELDS = {"resume", "overwrite", "stop_after_steps", "cache_dir", "tensorboard", "output_dir",
                      "eval_every", "save_every", "keep_last"}
