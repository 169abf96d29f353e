"""One variant, one process: build, warm up, time training steps, print one JSON result.

    python -m te_llama.bench.measure '{"variant": "te-bf16", "preset": "llama2-7b", ...}'

Timing: CUDA events around each step (forward, backward, AdamW step, zero_grad), after the
warm-up steps; median and spread over the timed steps. By default the loss is read after each
step (a host sync, as a loop that logs every step does); `sync_each_step=False` queues steps
back to back. Every variant is timed the same way. The token batches come from a seeded
generator (never zeros) and are the same for every variant.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForCausalLM

from ..model.presets import preset_config
from ..precision import autocast
from ..train.layerwise_adamw import GRAD_BUFFER_SETS, LayerwiseAdamW
from ..train.loss import causal_lm_loss
from .variants import VARIANTS, Variant, prepare

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
    """Read the loss (a host sync) after every step, as a loop that logs each step does."""
    layout_kwargs: bool = False
    """Give te-llama layers the packed layout up front (cu_seq_lens_q), sparing their host sync."""
    data: str = "random"
    """"random": seeded random token ids; "sample": the bundled sample text and chat, tokenized by
    the built-in tokenizer and cut into rows (a loss-curve check on real text; ids stay below 512)."""
    lr: float = 1e-5
    """AdamW's learning rate, the same for every variant (loss-curve checks at other rates)."""


@dataclass
class BenchResult:
    variant: str
    status: str
    """"ok", "skipped" or "failed"."""
    reason: str | None = None
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


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 x matmul params (embeddings excluded, lm_head included)
    plus causal attention, 6 x layers x seq x (heads x head_dim) (QK^T and AV, fwd + 2x bwd, half masked)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    matmul_params = layers * per_layer + h * config.vocab_size
    return 6 * matmul_params + 6 * layers * seq * q


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


def packed_layout_kwargs(settings: BenchSettings, device) -> dict:
    """Each row one sequence, told to te-llama layers up front (HF's packed-sequence kwargs)."""
    cu = torch.arange(0, (settings.batch + 1) * settings.seq, settings.seq, dtype=torch.int32, device=device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": settings.seq, "max_length_k": settings.seq}


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in name), None)


def build_model(variant_name: str, settings: BenchSettings) -> tuple[torch.nn.Module, dict]:
    """The variant's model, ready to train, and the extra forward kwargs every step passes."""
    variant = VARIANTS[variant_name]
    cuda = "cuda" in variant.needs
    device = torch.device("cuda") if cuda else torch.device("cpu")
    config = preset_config(settings.preset)
    torch.manual_seed(settings.seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    model = prepare(variant, model).train()
    if variant.cuda_graphs:  # every bench row is one full-length sequence
        from ..train.cuda_graphs import StaticShape, capture_cuda_graphs

        capture_cuda_graphs(model, StaticShape(settings.batch * settings.seq, settings.batch, settings.seq),
                            variant.precision, accumulate_grads=False,  # one backward per step
                            shared_grad_buffers=GRAD_BUFFER_SETS if variant.overlap_optimizer else 0)
    ours = variant.name.startswith(("te-", "reference"))
    layout_up_front = ours and (settings.layout_kwargs or variant.cuda_graphs)
    return model, packed_layout_kwargs(settings, device) if layout_up_front else {}


def make_optimizer(model: torch.nn.Module, variant: Variant, fused: bool, lr: float) -> torch.optim.Optimizer:
    """AdamW (BF16 moments on BF16 weights, lr from the settings) for every variant; per layer for the overlap variants."""
    if variant.optimizer_kernel == "triton" and not variant.overlap_optimizer:  # no layers: AdamW after backward
        return LayerwiseAdamW(model, [], kernel="triton", lr=lr, fused=fused)
    if variant.overlap_optimizer:
        from ..model.convert import decoder_layers

        optimizer = LayerwiseAdamW(model, list(decoder_layers(model)), variant.overlap_stream_priority,
                                   GRAD_BUFFER_SETS if variant.cuda_graphs else 0, variant.optimizer_kernel, lr=lr,
                                   fused=fused)
        if variant.cast_fp8_weights_in_optimizer:
            from ..train.cuda_graphs import cast_fp8_weights_after_updates

            cast_fp8_weights_after_updates(model, optimizer)
        return optimizer
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=fused)


def training_loss(model: torch.nn.Module, variant: Variant, ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """The variant's loss on `ids` (its own labels): te_llama's fused loss or the model's own."""
    if variant.fused_loss:
        return causal_lm_loss(model, ids, input_ids=ids, **extra)
    return model(input_ids=ids, labels=ids, **extra).loss


def last_pass_mean(losses: list[float], distinct_batches: int) -> float | None:
    """The mean of the last `distinct_batches` losses (None when fewer steps ran)."""
    if len(losses) < distinct_batches:
        return None
    return sum(losses[-distinct_batches:]) / distinct_batches


def measure(variant_name: str, settings: BenchSettings) -> BenchResult:
    variant = VARIANTS[variant_name]
    cuda = "cuda" in variant.needs
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model, extra = build_model(variant_name, settings)
    config = model.config
    optimizer = make_optimizer(model, variant, fused=cuda, lr=settings.lr)
    batches = token_batches(settings, config.vocab_size, device)
    times, losses, events = [], [], []
    for step in range(settings.warmup + settings.steps):
        ids = batches[step % len(batches)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with autocast(variant.precision):
            loss = training_loss(model, variant, ids, extra)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if cuda:
            end.record()
            events.append((start, end))
            if settings.sync_each_step:
                float(losses[-1])
        else:
            times.append(1000 * (time.perf_counter() - t0))
    if cuda:
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    times = times[settings.warmup:]
    ordered = sorted(times)
    median = ordered[len(ordered) // 2]
    tokens_per_s = settings.batch * settings.seq / (median / 1000)
    tflops = tokens_per_s * flops_per_token(config, settings.seq) / 1e12
    peak = peak_tflops(device)
    curve = [float(loss) for loss in losses]
    return BenchResult(
        variant_name, "ok", median_ms=median, p10_ms=ordered[len(ordered) // 10],
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
