"""The finetune recipe: setup -> train -> save -> cleanup, in one readable file.

Components (data, batching, checkpoints, metrics) are plain functions in their own modules;
this file wires them together through accelerate, so `accelerate launch` works unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler

from ..availability import te_available, triton_available
from ..model.builtin import SAMPLE_TEXT, asset_path, builtin_model, builtin_tokenizer
from ..model.convert import convert, decoder_layers
from ..model.hf_checkpoint import from_pretrained, save_pretrained
from ..model.presets import preset_config
from ..model.source import resolve_model
from ..precision import (
    FP8_PRECISIONS,
    autocast,
    check_precision_available,
    keep_layers_in_bf16,
)
from .batching import (
    Batch,
    collate_packed,
    collate_padded,
    max_docs_per_batch,
    plan_epoch,
)
from .checkpoints import (
    Position,
    checkpoints,
    load_checkpoint,
    save_checkpoint,
    sweep_incomplete,
    sweep_interrupted_exports,
)
from .config import ConfigError, FinetuneConfig
from .cuda_graphs import (
    StaticShape,
    capture_cuda_graphs,
    cast_fp8_weights_after_updates,
    graphs_leave_room,
    graphs_unsupported_reason,
    installed_graphs,
    release_cuda_graphs,
)
from .data import DataError, DataReport, data_fingerprint, load_examples, split_eval
from .faults import StopRequests, TrainingInterrupted, out_of_memory, signal_name
from .layerwise_adamw import GRAD_BUFFER_SETS, LayerwiseAdamW
from .loss import causal_lm_loss
from .metrics import MetricsLog, plot_metrics, read_metrics
from .parallel import (
    full_state_dict,
    grad_norm_value,
    load_sharded_checkpoint,
    require_process_group,
    save_sharded_checkpoint,
    shard_fsdp2,
)
from .run_dir import (
    check_output_dir,
    check_resume_fingerprint,
    prepare_output_dir,
    resume_command,
)

logger = logging.getLogger(__name__)

@dataclass
class FinetuneResult:
    steps: int
    final_loss: float
    eval_loss: float | None
    useful_tokens_per_s: float
    output_dir: Path
    exported: Path | None


@dataclass
class Runtime:
    """Choices resolved from 'auto' for this machine."""

    device: torch.device
    backend: str
    precision: str
    param_dtype: torch.dtype


def resolve_runtime(config: FinetuneConfig) -> Runtime:
    """'auto' resolved for this machine; combinations that cannot run here refused with the fix."""
    cuda = torch.cuda.is_available()
    backend = config.backend if config.backend != "auto" else ("te" if cuda and te_available() else "reference")
    precision = config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision in FP8_PRECISIONS and backend != "te":
        raise ConfigError(f"--precision {precision} needs --backend te (FP8 GEMMs are Transformer Engine's)")
    check_precision_available(precision)
    dtype_name = config.param_dtype if config.param_dtype != "auto" else ("bfloat16" if cuda else "float32")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Runtime(device, backend, precision, getattr(torch, dtype_name))


def check_sequence_length(config: FinetuneConfig, model_path: Path | None) -> None:
    """Refuse --max-seq-len past the positions the model was trained for (read from its config only)."""
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=False) if model_path else \
        preset_config("tiny-llama")
    limit = getattr(hf_config, "max_position_embeddings", None)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic" or not limit or config.max_seq_len <= limit:
        return  # dynamic NTK scaling is meant to run past the trained length
    raise ConfigError(f"--max-seq-len {config.max_seq_len} is above the model's max_position_embeddings {limit} "
                      f"({model_path or 'built-in model'}): it was never trained on positions past it; "
                      f"use --max-seq-len {limit} or less")


def load_model_and_tokenizer(config: FinetuneConfig, runtime: Runtime, model_path: Path | None = None
                             ) -> tuple[Any, Any]:
    """The model (converted unless backend 'hf') and its tokenizer; never runs code from the checkpoint."""
    if model_path is None:
        tokenizer = builtin_tokenizer()
        model = builtin_model(tokenizer, dtype=runtime.param_dtype, seed=config.seed).to(runtime.device)
        if runtime.backend != "hf":
            model = convert(model, backend=runtime.backend, fuse_qkv=config.fuse_qkv)
    elif runtime.backend == "hf":  # the baseline: transformers as is (SDPA attention)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=runtime.param_dtype,
                                                     trust_remote_code=False).to(runtime.device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        model = from_pretrained(model_path, backend=runtime.backend, torch_dtype=runtime.param_dtype,
                                fuse_qkv=config.fuse_qkv, device=runtime.device)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token "
                            "(padding mode needs one) or use --packing")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using eos %r (pad positions carry no loss)", tokenizer.eos_token)
    if config.activation_checkpointing:  # renamed in newer transformers; same switch
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer


class BatchSource:
    """Deterministic batches by (seed, epoch, index): resuming needs only the position."""

    def __init__(self, examples, config: FinetuneConfig, pad_token_id: int, with_cu_seqlens: bool = False) -> None:
        self.ids, self.labels = examples["input_ids"], examples["labels"]
        self.with_cu_seqlens = with_cu_seqlens
        self.pad_to: int | None = None
        """Packed rows padded to this many tokens (a fixed shape, for CUDA graphs)."""
        self.lengths = [len(x) for x in self.ids]
        self.config, self.pad_token_id = config, pad_token_id
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            c = self.config
            self._plans = {epoch: plan_epoch(self.lengths, c.packing, c.batch_size, c.max_seq_len, c.seed, epoch)}
        return self._plans[epoch]

    def batch(self, indices: list[int]) -> Batch:
        examples = [{"input_ids": self.ids[i], "labels": self.labels[i]} for i in indices]
        if self.config.packing:
            return collate_packed(examples, with_cu_seqlens=self.with_cu_seqlens, pad_to=self.pad_to,
                                  pad_token_id=self.pad_token_id, max_doc_len=self.config.max_seq_len)
        return collate_padded(examples, self.pad_token_id)

    def next(self, position: Position, rank: int = 0, world: int = 1) -> Batch:
        """This rank's micro-batch of the next `world` ones in the global order, advancing `position`.

        Every rank walks the same global sequence of micro-batches; the data position is
        global, so a run can resume with a different number of processes.
        """
        chosen = None
        for index in range(world):
            if position.batch_in_epoch >= len(self.plan(position.epoch)):
                position.epoch, position.batch_in_epoch = position.epoch + 1, 0
            if index == rank:
                chosen = self.plan(position.epoch)[position.batch_in_epoch]
            position.batch_in_epoch += 1
        return self.batch(chosen)


def total_steps(config: FinetuneConfig, source: BatchSource, world: int = 1) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, config.epochs * math.ceil(len(source.plan(0)) / (config.grad_accum * world)))


def graphs_off_reason(config: FinetuneConfig, runtime: Runtime, model, world: int) -> str | None:
    if not config.cuda_graphs:
        return "--no-cuda-graphs"
    if runtime.backend != "te":
        return f"backend={runtime.backend!r} (graphs are for TE layers)"
    if not config.packing:
        return "padding mode gives every batch another shape (packing gives one)"
    if world > 1:
        return "several processes (graphs are single-process for now)"
    if config.parallel == "fsdp2":
        return "FSDP2 gathers each layer's weights outside any graph"
    return graphs_unsupported_reason(model)


def fused_loss_off_reason(config: FinetuneConfig, runtime: Runtime, world: int) -> str | None:
    """Why the training step keeps transformers' loss, or None. The fused loss calls the decoder
    and lm_head directly, past the model's forward, which DDP and FSDP2 need to run."""
    if not config.fused_loss:
        return "--no-fused-loss"
    if runtime.backend == "hf":
        return "backend 'hf' is the baseline as transformers runs it"
    if world > 1 or config.parallel == "fsdp2":
        return "several processes (DDP / FSDP2 act in the model's forward)"
    return None


def overlap_off_reason(config: FinetuneConfig, runtime: Runtime, world: int) -> str | None:
    """Why LayerwiseAdamW would not be exactly AdamW after backward here, or None. (On a CPU it
    runs each layer's update inline: the same math, nothing gained, nothing lost.)"""
    if not config.overlap_optimizer:
        return "--no-overlap-optimizer"
    if config.grad_accum > 1:
        return "grad_accum > 1 (gradients are final only after the last micro-batch)"
    if config.max_grad_norm > 0:
        return ("max_grad_norm > 0 (clipping needs every gradient before any update; "
                "--max-grad-norm 0 turns the overlap on)")
    if world > 1 or config.parallel == "fsdp2":
        return "several processes (gradients are reduced after backward)"
    if config.activation_checkpointing:
        return "activation checkpointing re-runs layers inside backward"
    return None


def hand_fp8_casts(config: FinetuneConfig, model, optimizer: torch.optim.Optimizer, overlap_off: str | None) -> None:
    """FP8 graphs: cast the weights once per optimizer step (not per micro-batch), or, with the
    overlapped optimizer and `fp8_weight_cache`, in the optimizer right after each layer's update."""
    graphs = installed_graphs(model)
    graphs.track_weight_updates(optimizer)
    if config.fp8_weight_cache and overlap_off is None and graphs.fp8_weight_cache is not None:
        cast_fp8_weights_after_updates(model, optimizer)
        logger.info("FP8 weights: cast after each layer's update, on the optimizer's stream")
    else:
        logger.info("FP8 weights: cast in the first forward after each optimizer step")


def optimizer_kernel(config: FinetuneConfig, runtime: Runtime) -> str:
    """The AdamW update kernel this run uses ("auto": Triton's where it runs)."""
    if config.optimizer_kernel == "triton" and config.parallel == "fsdp2":
        raise ValueError("optimizer_kernel='triton' updates plain tensors; FSDP2 shards them (use 'torch')")
    if config.optimizer_kernel == "triton" and not triton_available(runtime.device):
        raise ValueError("optimizer_kernel='triton' needs a CUDA GPU and Triton (pip install triton); use 'torch'")
    if config.optimizer_kernel != "auto":
        return config.optimizer_kernel
    return "triton" if triton_available(runtime.device) and config.parallel != "fsdp2" else "torch"


def make_optimizer(config: FinetuneConfig, runtime: Runtime, model, params: list,
                   overlap_off: str | None) -> torch.optim.Optimizer:
    """AdamW; per decoder layer during backward unless `overlap_off` says why not (`overlap_off_reason`);
    Triton's update kernel where it runs (`optimizer_kernel`). LayerwiseAdamW without layers is plain AdamW."""
    kernel = optimizer_kernel(config, runtime)
    if overlap_off:
        logger.info("optimizer overlap off: %s", overlap_off)
    adamw = {"lr": config.learning_rate, "weight_decay": config.weight_decay, "fused": runtime.device.type == "cuda"}
    logger.info("optimizer: AdamW, %s kernel%s", kernel, "" if overlap_off else ", each layer updated during backward")
    if overlap_off and kernel == "torch":
        return torch.optim.AdamW(params, **adamw)
    layers = [] if overlap_off else list(decoder_layers(model))  # docs/SPEED_NOTES.md, changes 4-6
    return LayerwiseAdamW(model, layers, reused_grad_buffers=0 if overlap_off else GRAD_BUFFER_SETS, kernel=kernel,
                          **adamw)


def setup_cuda_graphs(config: FinetuneConfig, runtime: Runtime, model, train: BatchSource, steps: int,
                      world: int, shared_grad_buffers: int = 0) -> bool:
    """Capture the layers for the packed token budget, and pad every training row to it.
    shared_grad_buffers: for LayerwiseAdamW, whose updates consume each layer's gradients in backward."""
    reason = graphs_off_reason(config, runtime, model, world)
    if reason:
        logger.info("CUDA graphs off: %s", reason)
        return False
    budget = config.batch_size * config.max_seq_len
    batches_per_epoch = max(1, len(train.plan(0)))
    epochs = config.epochs if config.max_steps is None else \
        math.ceil(steps * config.grad_accum / batches_per_epoch) + 1
    plans = (plan_epoch(train.lengths, True, config.batch_size, config.max_seq_len, config.seed, e)
             for e in range(epochs))
    max_docs = max_docs_per_batch(plans, train.lengths, budget, config.max_seq_len)
    try:
        capture_cuda_graphs(model, StaticShape(budget, max_docs, config.max_seq_len), runtime.precision,
                            accumulate_grads=config.grad_accum > 1, shared_grad_buffers=shared_grad_buffers)
    except torch.OutOfMemoryError:
        release_cuda_graphs(model)
        raise out_of_memory(runtime.device, budget, memory_fixes(config, runtime, graphed=True),
                            "while capturing the CUDA graphs") from None
    logits_bytes = 3 * budget * model.config.vocab_size * 4  # FP32 logits, their grad, softmax
    fits, detail = graphs_leave_room(model, runtime.device, logits_bytes + 2 * 2**30)
    if not fits:
        release_cuda_graphs(model)
        logger.warning("CUDA graphs off: they keep their activation memory reserved and would leave too little "
                       "for the optimizer (%s); running eagerly (lower --batch-size or --max-seq-len to use them)",
                       detail)
        return False
    train.pad_to = budget
    return True


def evaluate(model, source: BatchSource | None, runtime: Runtime) -> float | None:
    """Token-weighted mean loss over the eval split."""
    if source is None:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in source.plan(0):
            batch = source.batch(indices)
            inputs = {k: v.to(runtime.device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            targets = int((inputs["labels"][:, 1:] != -100).sum())
            with autocast(runtime.precision):
                total += float(model(**inputs).loss) * targets
            count += targets
    model.train()
    return total / max(count, 1)


def _truncate_metrics(path: Path, step: int) -> None:
    """After resuming at `step`, forget rows logged after that checkpoint by the interrupted run."""
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def memory_fixes(config: FinetuneConfig, runtime: Runtime, graphed: bool) -> list[str]:
    """The options that lower this run's GPU memory, most effective first."""
    fixes = [f"--batch-size {max(1, config.batch_size // 2)} (now {config.batch_size}; add --grad-accum "
             f"{2 * config.grad_accum} to keep the batch)" if config.batch_size > 1 else
             f"--max-seq-len {max(1, config.max_seq_len // 2)} (now {config.max_seq_len})"]
    if not config.activation_checkpointing:
        fixes.append("--activation-checkpointing (recompute layers in backward: about a third more compute)")
    if graphed:
        fixes.append("--no-cuda-graphs (graphs keep their activation memory reserved)")
    if runtime.param_dtype == torch.float32 and runtime.device.type == "cuda":
        fixes.append("--param-dtype bfloat16")
    fixes.append("several GPUs with --parallel fsdp2 (shards weights and optimizer state)")
    return fixes


def finetune(config: FinetuneConfig) -> FinetuneResult:
    # ---- setup: every check before any slow work; the first write only once model and data are good
    runtime = resolve_runtime(config)
    accelerator = Accelerator(cpu=runtime.device.type == "cpu")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if world > 1 and runtime.device.type == "cuda":
        runtime.device = accelerator.device
    fsdp = config.parallel == "fsdp2"
    if fsdp:
        require_process_group("fsdp2")
    out = Path(config.output_dir)
    check_output_dir(config, world)
    optimizer_kernel(config, runtime)
    with accelerator.main_process_first():  # a Hub id is downloaded once
        model_path = resolve_model(config.model) if config.model else None
    check_sequence_length(config, model_path)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config, runtime, model_path)
    if config.bf16_first_layers or config.bf16_last_layers:  # before graphs and sharding see the layers
        kept = keep_layers_in_bf16(model, config.bf16_first_layers, config.bf16_last_layers)
        logger.info("decoder layers %s run in BF16%s", kept, "" if runtime.precision in FP8_PRECISIONS
                    else f" (inert: precision {runtime.precision} has no FP8)")
    data = config.data or str(asset_path(SAMPLE_TEXT))
    fingerprint = data_fingerprint(data, tokenizer, config.data_split)
    if config.resume:
        check_resume_fingerprint(out, fingerprint)
    cache_dir = config.cache_dir or str(Path.home() / ".cache" / "te-llama")
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others read it
        examples, report = load_examples(data, tokenizer, config.max_seq_len, cache_dir, config.text_field,
                                         config.assistant_only_loss, config.long_rows, config.on_bad_rows,
                                         split=config.data_split, fingerprint=fingerprint)
    if main:
        prepare_output_dir(config, world, fingerprint)
        sweep_interrupted_exports(out)
        (out / "data_report.json").write_text(json.dumps(asdict(report), indent=2))
    accelerator.wait_for_everyone()
    train_set, eval_set = split_eval(examples, config.eval_fraction, config.seed)
    ours = runtime.backend != "hf"  # te-llama layers take the packed layout from the host
    train = BatchSource(train_set, config, tokenizer.pad_token_id, with_cu_seqlens=ours)
    evals = BatchSource(eval_set, config, tokenizer.pad_token_id, with_cu_seqlens=ours) if eval_set is not None else None
    steps = total_steps(config, train, world)

    if fsdp:
        model = shard_fsdp2(model)
    params = [p for p in model.parameters() if p.requires_grad]
    overlap_off = overlap_off_reason(config, runtime, world)
    optimizer = make_optimizer(config, runtime, model, params, overlap_off)
    scheduler = get_scheduler(config.schedule if config.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(config.warmup_ratio * steps), num_training_steps=steps)
    # The schedule counts optimizer steps of the global batch, so it stays outside prepare()
    # (accelerate would step it once per process).
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)

    ckpt_root = out / "checkpoints"
    if main:
        sweep_incomplete(ckpt_root)
    accelerator.wait_for_everyone()
    position = Position()
    metrics = MetricsLog(out, config.tensorboard and main) if main else None
    if config.resume:
        found = checkpoints(ckpt_root)
        load_state = load_sharded_checkpoint if fsdp else load_checkpoint
        position = load_state(found[-1], accelerator.unwrap_model(model), optimizer, scheduler)
        if main:
            _truncate_metrics(metrics.path, position.step)
        logger.info("resumed from %s (step %d)", found[-1], position.step)
    graphed = setup_cuda_graphs(config, runtime, accelerator.unwrap_model(model), train, steps, world,
                                shared_grad_buffers=GRAD_BUFFER_SETS if not overlap_off and config.fuse_qkv else 0)
    if graphed and runtime.precision in FP8_PRECISIONS:
        hand_fp8_casts(config, accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer),
                       overlap_off)
    _log_start(config, runtime, report, len(train_set), steps, position)
    fused_off = fused_loss_off_reason(config, runtime, world)
    if fused_off:
        logger.info("fused loss off: %s", fused_off)
    raw_model = accelerator.unwrap_model(model)
    step_loss = (lambda inputs: model(**inputs).loss) if fused_off else (lambda inputs: causal_lm_loss(raw_model, **inputs))

    def save() -> None:
        if fsdp:  # every rank writes its shards
            save_sharded_checkpoint(ckpt_root, position, model, optimizer, scheduler, config.keep_last)
        elif main:  # data-parallel replicas are identical: one copy is the checkpoint
            save_checkpoint(ckpt_root, position, raw_model, optimizer, scheduler, config.keep_last)
        accelerator.wait_for_everyone()

    # ---- train
    stop_at = min(steps, position.step + config.stop_after_steps) if config.stop_after_steps else steps
    last_loss, eval_loss, speeds = float("nan"), None, []
    bar = tqdm(total=steps, initial=position.step, desc="finetune", disable=not main)
    last_save = time.monotonic()
    try:
        with StopRequests() as stops:
            while position.step < stop_at:
                start = time.perf_counter()
                loss_sum, real, padded = torch.zeros((), device=runtime.device), 0, 0
                for _ in range(config.grad_accum):
                    batch = train.next(position, rank, world)
                    inputs = {k: v.to(runtime.device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
                    with autocast(runtime.precision):
                        loss = step_loss(inputs)
                    accelerator.backward(loss / config.grad_accum)
                    loss_sum += loss.detach()
                    real, padded = real + batch.real_tokens, padded + batch.padded_tokens
                grad_norm = None
                if config.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if fsdp else \
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                save_due = config.save_every_minutes > 0 and \
                    time.monotonic() - last_save >= 60 * config.save_every_minutes
                signum = stops.signum or 0
                if world > 1:  # the global batch's mean loss and token counts; every rank stops together
                    counts = accelerator.reduce(torch.tensor([real, padded], device=runtime.device), "sum")
                    loss_sum, (real, padded) = accelerator.reduce(loss_sum, "mean"), counts.tolist()
                    flags = torch.tensor([signum, int(save_due)], device=runtime.device)
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                    signum, save_due = int(flags[0]), bool(flags[1])
                last_loss = float(loss_sum) / config.grad_accum  # syncs the device: the step is done
                elapsed = time.perf_counter() - start
                speeds.append(real / elapsed)
                if main:
                    metrics.log("train", position.step, loss=last_loss, lr=scheduler.get_last_lr()[0],
                                grad_norm=grad_norm_value(grad_norm) if grad_norm is not None else None,
                                step_ms=1000 * elapsed, tokens_per_s=real / elapsed, real_tokens=real,
                                padded_tokens=padded, epoch=position.epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{real / elapsed:,.0f}")
                if evals is not None and (position.step % config.eval_every == 0 or position.step == steps):
                    eval_loss = evaluate(model, evals, runtime)
                    if main:
                        metrics.log("eval", position.step, loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)))
                on_schedule = config.save_every > 0 and (position.step % config.save_every == 0 or
                                                         position.step == stop_at)
                stopping = signum and position.step < steps
                if on_schedule or save_due or stopping:
                    save()
                    last_save = time.monotonic()
                if stopping:
                    name = signal_name(signum)
                    raise TrainingInterrupted(f"{name}: stopped after step {position.step} of {steps}; checkpoint "
                                              f"saved in {ckpt_root}. Continue with: {resume_command()}", signum)
    except torch.OutOfMemoryError:
        raise out_of_memory(runtime.device, config.batch_size * config.max_seq_len,
                            memory_fixes(config, runtime, graphed), f"at step {position.step + 1}") from None
    finally:
        bar.close()
        if main:
            metrics.close()

    # ---- save
    exported = None
    if position.step == steps:
        gathered = full_state_dict(model) if fsdp else None  # a collective: every rank takes part
        if main:
            exported = export_final(raw_model, tokenizer, out / "final", runtime.backend, gathered)
    if main:
        plot_metrics(metrics.path, out / "metrics.png")
    accelerator.wait_for_everyone()
    # ---- cleanup
    tail = speeds[len(speeds) // 5:] or speeds
    result = FinetuneResult(position.step, last_loss, eval_loss, sum(tail) / max(len(tail), 1), out, exported)
    accelerator.end_training()
    return result


def export_final(model, tokenizer, path: Path, backend: str, state_dict: dict | None = None) -> Path:
    """The trained model as a plain HF checkpoint with its tokenizer (vanilla transformers / vLLM)."""
    if backend != "hf":
        return save_pretrained(model, path, tokenizer=tokenizer, state_dict=state_dict)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _log_start(config: FinetuneConfig, runtime: Runtime, report: DataReport, n_train: int, steps: int,
               position: Position) -> None:
    logger.info("te-llama finetune: model=%s backend=%s precision=%s params=%s device=%s packing=%s",
                config.model or "built-in tiny llama", runtime.backend, runtime.precision,
                str(runtime.param_dtype).removeprefix("torch."), runtime.device, config.packing)
    logger.info("data: %d rows -> %d train examples, %d tokens (%d malformed skipped, %d truncated, "
                "%d dropped too long, %d without targets); %d steps from step %d", report.rows, n_train,
                report.tokens, report.malformed_skipped, report.truncated, report.dropped_too_long,
                report.dropped_empty, steps, position.step)
