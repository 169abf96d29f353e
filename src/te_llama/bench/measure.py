"""One variant, one process: build the row's finetune step, warm up, time it, print one JSON result.

    python -m te_llama.bench.measure '{"variant": "te-default", "settings": {...}}'

The step timed is `te_llama.train.step.build_train_step` on the row's `FinetuneConfig`: the one
`te-llama finetune` runs (forward, backward, clipping, AdamW, schedule). Timing: CUDA events
around each step after the warm-up steps (graph capture and compilation happen there); median and
spread over the timed steps. By default the loss is read after each step (a host sync, as the
finetune loop does). Token rows come from a seeded generator (never zeros), the same for every
variant: one document of `seq` tokens per row, packed for te-llama rows, padded rows for peers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from ..model.convert import convert
from ..model.presets import preset_config
from ..train.batching import Batch, collate_packed, collate_padded
from ..train.config import GROUPS, FinetuneConfig
from ..train.cuda_graphs import StaticShape
from ..train.lora_run import fp8_base_recipe, peft_model, resolve_lora
from ..train.setup import check_recomputed_layers, prepare_for_training, resolve_runtime
from ..train.step import build_train_step
from .variants import PEER_LORA_OPTIONS, VARIANTS, Variant, apply_peer

DENSE_BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4,
                          "A100": 312.0}


@dataclass
class BenchSettings:
    preset: str = "llama2-7b"
    batch: int = 8
    seq: int = 256
    steps: int = 10
    warmup: int = 3
    seed: int = 0
    distinct_batches: int = 4
    sync_each_step: bool = True
    """Read the loss (a host sync) after every step, as the finetune loop does."""
    data: str = "random"
    """"random": seeded random token ids; "sample": the bundled sample text and chat, tokenized by
    the built-in tokenizer and cut into rows (a loss-curve check on real text; ids stay below 512)."""
    lr: float = 1e-5
    """AdamW's learning rate, the same for every variant."""
    options: dict[str, Any] = field(default_factory=dict)
    """Finetune options for every te-llama row (speed and optimization groups) and every peer
    (optimization group only), e.g. {"precision": "fp8", "max_grad_norm": 0.0}."""


@dataclass
class BenchResult:
    variant: str
    status: str
    """"ok", "skipped" or "failed"."""
    reason: str | None = None
    options: str | None = None
    """The row's finetune options that differ from te-llama finetune's defaults (e.g. clipping off)."""
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    """Most memory held by tensors at once (torch.cuda.max_memory_allocated)."""
    peak_reserved_gib: float | None = None
    """Most memory the caching allocator held, CUDA-graph pools included (what must fit on the GPU)."""
    final_loss: float | None = None
    last_pass_loss: float | None = None
    """Mean loss of the last steps that saw each distinct batch once: unlike the last step's loss,
    it does not depend on which batch happened to come last (a loss-curve comparison across variants)."""
    step_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """Every step's loss, warm-up steps included (the loss curve)."""


def flops_per_token(config, seq: int, adapter_params: int = 0) -> float:
    """Training FLOPs per token: 6 x matmul params (embeddings excluded, lm_head included)
    plus causal attention, 6 x layers x seq x (heads x head_dim) (QK^T and AV, fwd + 2x bwd, half masked).
    LoRA (`adapter_params` > 0): the frozen base's GEMMs have no weight gradient (4 x instead of 6 x),
    the adapters 6 x theirs."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    matmul_params = layers * per_layer + h * config.vocab_size
    return (4 if adapter_params else 6) * matmul_params + 6 * adapter_params + 6 * layers * seq * q


def token_batches(settings: BenchSettings, vocab: int, device) -> list[torch.Tensor]:
    if settings.data == "sample":
        return sample_text_batches(settings, device)
    if settings.data != "random":
        raise ValueError(f"data={settings.data!r} is unknown; choose 'random' or 'sample'")
    gen = torch.Generator().manual_seed(settings.seed)
    return [torch.randint(0, vocab, (settings.batch, settings.seq), generator=gen).to(device)
            for _ in range(settings.distinct_batches)]


def sample_text_batches(settings: BenchSettings, device) -> list[torch.Tensor]:
    """Every full batch of rows the bundled samples make (documents joined by EOS, in file order)."""
    from ..model.builtin import builtin_tokenizer, training_lines

    tokenizer = builtin_tokenizer()
    ids = [i for line in training_lines() for i in tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]]
    per_batch = settings.batch * settings.seq
    if len(ids) < per_batch:
        raise ValueError(f"the sample data has {len(ids)} tokens, fewer than one batch of {per_batch}")
    rows = torch.tensor(ids[:len(ids) // per_batch * per_batch]).view(-1, settings.batch, settings.seq)
    return [batch.to(device) for batch in rows]


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in name), None)


SHAPE_FIELDS = ("batch_size", "max_seq_len", "seed", "max_steps", "tensorboard", "learning_rate")
"""Options every row sets from the bench's own flags: not part of what distinguishes a row."""


def distinct_options(config: FinetuneConfig) -> str:
    """The options of `config` that are not finetune's defaults, as `--flag value` text."""
    defaults = FinetuneConfig()
    return " ".join(f"--{f.name.replace('_', '-')} {getattr(config, f.name)}" for f in fields(FinetuneConfig)
                    if f.name not in SHAPE_FIELDS and getattr(config, f.name) != getattr(defaults, f.name))


def row_config(variant: Variant, settings: BenchSettings) -> FinetuneConfig:
    """The finetune configuration this row runs on the bench's batch shape."""
    passed = {k: v for k, v in settings.options.items()
              if variant.ours or k in GROUPS["optimization"] or k in PEER_LORA_OPTIONS}
    return FinetuneConfig(**({"learning_rate": settings.lr} | variant.config | passed
                             | {"batch_size": settings.batch, "max_seq_len": settings.seq, "seed": settings.seed,
                                "max_steps": settings.warmup + settings.steps, "tensorboard": False}))


def micro_batches(rows: list[torch.Tensor], variant: Variant, pad_to: int | None) -> list[Batch]:
    """Each (batch, seq) tensor as finetune feeds it: one packed row of documents (te-llama) or padded rows."""
    out = []
    for row in rows:
        examples = [{"input_ids": ids, "labels": ids} for ids in row.tolist()]
        out.append(collate_packed(examples, with_cu_seqlens=True, pad_to=pad_to, max_doc_len=row.shape[1])
                   if variant.ours else collate_padded(examples, pad_token_id=0))
    return out


def build_step(variant: Variant, settings: BenchSettings):
    """The row's model (preset shape, random weights by seed) and its finetune step."""
    config = row_config(variant, settings)
    runtime = resolve_runtime(config)
    accelerator = Accelerator(cpu=runtime.device.type == "cpu")
    torch.manual_seed(settings.seed)
    hf_config = preset_config(settings.preset)
    check_recomputed_layers(config, hf_config)
    lora = resolve_lora(config, runtime.backend, hf_config)
    with runtime.device:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=runtime.param_dtype, attn_implementation="sdpa")
    peer = variant.peer
    if variant.ours:
        model = convert(model, backend=runtime.backend, fuse_qkv=config.fuse_qkv, lora=lora,
                        base_recipe=fp8_base_recipe(config, runtime.precision))
    elif lora is not None:  # PEFT wraps the model as the peer made it (Liger patches transformers' own modules)
        model = peft_model(apply_peer(peer, model) if peer == "liger" else model, lora)
        peer = None if peer == "liger" else peer
    model = apply_peer(peer, prepare_for_training(model, config, runtime))
    shape = StaticShape(settings.batch * settings.seq, settings.batch, settings.seq) if config.packing else None
    step = build_train_step(config, runtime, model, accelerator, config.max_steps, 1, shape)
    step.capture_graphs()
    return step, runtime


def last_pass_mean(losses: list[float], distinct_batches: int) -> float | None:
    """The mean of the last `distinct_batches` losses (None when fewer steps ran)."""
    if len(losses) < distinct_batches:
        return None
    return sum(losses[-distinct_batches:]) / distinct_batches


def measure(variant_name: str, settings: BenchSettings) -> BenchResult:
    variant = VARIANTS[variant_name]
    step, runtime = build_step(variant, settings)
    cuda = runtime.device.type == "cuda"
    config = step.raw_model.config
    rows = token_batches(settings, config.vocab_size, torch.device("cpu"))
    batches = micro_batches(rows, variant, step.graph_shape.tokens if step.graph_shape else None)
    times, losses, events = [], [], []
    for index in range(settings.warmup + settings.steps):
        batch = batches[index % len(batches)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        loss, _ = step([batch])
        losses.append(loss)
        if cuda:
            end.record()
            events.append((start, end))
            if settings.sync_each_step:
                float(loss)
        else:
            times.append(1000 * (time.perf_counter() - t0))
    if cuda:
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    times = times[settings.warmup:]
    ordered = sorted(times)
    median = ordered[len(ordered) // 2]
    tokens_per_s = settings.batch * settings.seq / (median / 1000)
    adapters = sum(p.numel() for p in step.raw_model.parameters() if p.requires_grad) if step.config.lora else 0
    tflops = tokens_per_s * flops_per_token(config, settings.seq, adapters) / 1e12
    peak = peak_tflops(runtime.device)
    curve = [float(loss) for loss in losses]
    return BenchResult(
        variant_name, "ok", options=distinct_options(step.config), median_ms=median, p10_ms=ordered[len(ordered) // 10],
        p90_ms=ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)], tokens_per_s=tokens_per_s,
        tflops=tflops, mfu=tflops / peak if peak else None,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        final_loss=curve[-1], last_pass_loss=last_pass_mean(curve, len(batches)), step_ms=times, losses=curve)


def main() -> None:
    request = json.loads(sys.argv[1])
    settings = BenchSettings(**request["settings"])
    print(json.dumps(asdict(measure(request["variant"], settings))))


if __name__ == "__main__":
    main()
