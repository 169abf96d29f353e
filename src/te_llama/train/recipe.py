"""The finetune recipe: setup -> train -> save -> cleanup, in one readable file.

Components (data, batching, the training step, checkpoints, metrics) live in their own modules;
this file wires them together through accelerate, so `accelerate launch` / torchrun work unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from ..model.builtin import SAMPLE_TEXT, asset_path
from ..model.convert import decoder_layers
from ..model.hf_checkpoint import save_pretrained
from ..model.source import resolve_model
from ..precision import DEFAULT_FP8, autocast
from .batch_plan import plan_batch
from .batching import (
    Batch,
    collate_packed,
    collate_padded,
    max_docs_per_batch,
    plan_epoch,
)
from .checkpoints import (
    EXPORT_NAME,
    Position,
    checkpoints,
    load_checkpoint,
    save_checkpoint,
    sweep_incomplete,
    sweep_interrupted_exports,
)
from .config import FinetuneConfig
from .cuda_graphs import StaticShape
from .data import DataReport, data_fingerprint, load_examples, split_eval
from .faults import StopRequests, TrainingInterrupted, out_of_memory, signal_name
from .metrics import MetricsLog, plot_metrics, read_metrics
from .parallel import (
    full_state_dict,
    grad_norm_value,
    load_sharded_checkpoint,
    require_process_group,
    save_sharded_checkpoint,
)
from .run_dir import (
    check_output_dir,
    check_resume_fingerprint,
    check_resume_resolved,
    eval_split_seed,
    prepare_output_dir,
    resume_command,
    saved_resolved,
    with_started_batch_size,
)
from .lora_run import export_lora, model_config, resolve_lora
from .setup import check_model_limits, load_model_and_tokenizer, resolve_runtime
from .step import Runtime, TrainStep, build_train_step, memory_fixes, resolve_features

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    steps: int
    final_loss: float
    eval_loss: float | None
    useful_tokens_per_s: float
    output_dir: Path
    exported: Path | None


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


def graph_shape(config: FinetuneConfig, train: BatchSource, steps: int) -> StaticShape:
    """The packed micro-batch CUDA graphs are captured for: the token budget, and the most documents
    any micro-batch of this run holds (every epoch it will see)."""
    budget = config.batch_size * config.max_seq_len
    batches_per_epoch = max(1, len(train.plan(0)))
    epochs = config.epochs if config.max_steps is None else math.ceil(steps * config.grad_accum / batches_per_epoch) + 1
    plans = (plan_epoch(train.lengths, True, config.batch_size, config.max_seq_len, config.seed, e)
             for e in range(epochs))
    return StaticShape(budget, max_docs_per_batch(plans, train.lengths, budget, config.max_seq_len), config.max_seq_len)


def evaluate(step: TrainStep, source: BatchSource | None, runtime: Runtime) -> float | None:
    """Token-weighted mean loss over the eval split, computed as training computes it."""
    if source is None:
        return None
    model = step.model
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in source.plan(0):
            batch = source.batch(indices)
            inputs = {k: v.to(runtime.device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            targets = int((inputs["labels"][:, 1:] != -100).sum())
            with autocast(runtime.precision):
                total += float(step.loss(inputs)) * targets
            count += targets
    model.train()
    return total / max(count, 1)


def peak_memory(device: torch.device) -> list[int]:
    """This process's peak GPU bytes so far: held by tensors, and reserved by the allocator (CUDA-graph pools
    included: what must fit); none on a CPU."""
    if device.type != "cuda":
        return []
    return [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]


def _truncate_metrics(path: Path, step: int) -> None:
    """After resuming at `step`, forget rows logged after that checkpoint by the interrupted run."""
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Run:
    """Everything a started run holds: set up once by `start_run`, then trained and saved."""

    config: FinetuneConfig
    runtime: Runtime
    accelerator: Accelerator
    tokenizer: Any
    train: BatchSource
    evals: BatchSource | None
    steps: int
    step: TrainStep
    position: Position
    metrics: MetricsLog | None
    """Written by the main process only."""

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> None:
        config, step = self.config, self.step
        step.settle()
        if config.parallel == "fsdp2":  # every rank writes its shards
            save_sharded_checkpoint(self.checkpoints, self.position, step.raw_model, step.optimizer, step.scheduler,
                                    config.keep_last, trainable_only=config.lora)
        elif self.accelerator.is_main_process:  # data-parallel replicas are identical: one copy is the checkpoint
            save_checkpoint(self.checkpoints, self.position, step.raw_model, step.optimizer, step.scheduler,
                            config.keep_last, trainable_only=config.lora)
        self.accelerator.wait_for_everyone()


def start_run(config: FinetuneConfig) -> Run:
    """Every check before any slow work; the first write only once model and data are known good."""
    config = with_started_batch_size(config)
    runtime = resolve_runtime(config)
    resolved = {"backend": runtime.backend,  # "fp8" recorded as the recipe it stands for today
                "precision": DEFAULT_FP8 if runtime.precision == "fp8" else runtime.precision,
                "param_dtype": str(runtime.param_dtype).removeprefix("torch.")}
    # DDP's gradients as views of its all-reduce buckets: one copy of the gradients, not two
    accelerator = Accelerator(cpu=runtime.device.type == "cpu",
                              kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    main, world = accelerator.is_main_process, accelerator.num_processes
    if world > 1 and runtime.device.type == "cuda":
        runtime.device = accelerator.device
    if config.parallel == "fsdp2":
        require_process_group("fsdp2")
    out = Path(config.output_dir)
    check_output_dir(config, world)
    if config.resume:
        check_resume_resolved(out, resolved, runtime.device.type == "cuda")
    resolve_features(config, runtime, None, world, log=False)  # an explicit feature that cannot run: refused now
    with accelerator.main_process_first():  # a Hub id is downloaded once
        model_path = resolve_model(config.model) if config.model else None
    check_model_limits(config, model_path)
    resolve_lora(config, runtime.backend, model_config(model_path))  # a bad LoRA setting, before loading
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config, runtime, model_path)
    # what only the model can rule out, still before writing
    features = resolve_features(config, runtime, model, world, log=False)
    ours = runtime.backend != "hf"  # te-llama layers take the packed layout from the host
    plan = plan_batch(config, runtime, model, features.fused_loss, ours, tokenizer.pad_token_id,
                      recorded=saved_resolved(out) if config.resume else None)
    if config.batch_size == "auto":
        resolved["batch_size"] = str(plan.batch_size)
    as_given, config = config, replace(config, batch_size=plan.batch_size, grad_accum=plan.grad_accum)
    resolve_features(config, runtime, model, world, log=False)  # an explicit feature the split rules out: now
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
        prepare_output_dir(as_given, world, fingerprint, resolved)
        sweep_interrupted_exports(out)
        sweep_incomplete(out / "checkpoints")
        (out / "data_report.json").write_text(json.dumps(asdict(report), indent=2))
    accelerator.wait_for_everyone()
    train_set, eval_set = split_eval(examples, config.eval_fraction, eval_split_seed(config))
    train = BatchSource(train_set, config, tokenizer.pad_token_id, with_cu_seqlens=ours)
    evals = BatchSource(eval_set, config, tokenizer.pad_token_id, with_cu_seqlens=ours) if eval_set is not None else None
    steps = total_steps(config, train, world)
    step = build_train_step(config, runtime, model, accelerator, steps, world,
                            graph_shape(config, train, steps) if config.packing else None)
    run = Run(config, runtime, accelerator, tokenizer, train, evals, steps, step, Position(),
              MetricsLog(out, config.tensorboard) if main else None)
    if config.resume:
        found = checkpoints(run.checkpoints)[-1]
        load_state = load_sharded_checkpoint if config.parallel == "fsdp2" else load_checkpoint
        run.position = load_state(found, step.raw_model, step.optimizer, step.scheduler, trainable_only=config.lora)
        if main:
            _truncate_metrics(run.metrics.path, run.position.step)
        logger.info("resumed from %s (step %d)", found, run.position.step)
    step.capture_graphs()  # after loading a resumed run's weights
    train.pad_to = step.graph_shape.tokens if step.graph_shape else None  # graphs need one shape
    _log_start(config, runtime, report, len(train_set), steps, run.position)
    return run


def train(run: Run) -> tuple[float, float | None, list[float]]:
    """Optimizer steps until the end (or --stop-after-steps): the last loss, the last eval loss and
    each step's useful tokens/s. A signal stops after the current step, with a checkpoint."""
    config, position, accelerator, device = run.config, run.position, run.accelerator, run.runtime.device
    rank, world = accelerator.process_index, accelerator.num_processes
    stop_at = min(run.steps, position.step + config.stop_after_steps) if config.stop_after_steps else run.steps
    last_loss, eval_loss, speeds = float("nan"), None, []
    bar = tqdm(total=run.steps, initial=position.step, desc="finetune", disable=not accelerator.is_main_process)
    last_save = time.monotonic()
    try:
        with StopRequests() as stops:
            while position.step < stop_at:
                start = time.perf_counter()
                micro_batches = [run.train.next(position, rank, world) for _ in range(config.grad_accum)]
                loss, grad_norm = run.step(micro_batches)
                real = sum(b.real_tokens for b in micro_batches)
                padded = sum(b.padded_tokens for b in micro_batches)
                position.step += 1
                save_due = config.save_every > 0 and config.save_every_minutes > 0 and \
                    time.monotonic() - last_save >= 60 * config.save_every_minutes
                signum = stops.signum or 0
                peaks = peak_memory(device)
                if world > 1:  # the global batch's mean loss and token counts; every rank stops together
                    counts = accelerator.reduce(torch.tensor([real, padded], device=device), "sum")
                    loss, (real, padded) = accelerator.reduce(loss, "mean"), counts.tolist()
                    flags = torch.tensor([signum, int(save_due), *peaks], device=device)  # peaks: the fullest GPU's
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                    signum, save_due, peaks = int(flags[0]), bool(flags[1]), flags[2:].tolist()
                last_loss = float(loss)  # waits for forward and backward (AdamW's layer updates may overlap the next forward)
                elapsed = time.perf_counter() - start
                speeds.append(real / elapsed)
                if run.metrics is not None:
                    run.metrics.log("train", position.step, loss=last_loss, lr=run.step.scheduler.get_last_lr()[0],
                                    grad_norm=grad_norm_value(grad_norm) if grad_norm is not None else None,
                                    step_ms=1000 * elapsed, tokens_per_s=real / elapsed, real_tokens=real,
                                    padded_tokens=padded, epoch=position.epoch,
                                    **({"peak_allocated_gib": peaks[0] / 2**30, "peak_reserved_gib": peaks[1] / 2**30}
                                       if peaks else {}))
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{real / elapsed:,.0f}")
                if run.evals is not None and (position.step % config.eval_every == 0 or position.step == run.steps):
                    eval_loss = evaluate(run.step, run.evals, run.runtime)
                    if run.metrics is not None:
                        run.metrics.log("eval", position.step, loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)))
                on_schedule = config.save_every > 0 and (position.step % config.save_every == 0 or
                                                         position.step == stop_at)
                stopping = signum and position.step < run.steps
                if on_schedule or save_due or stopping:
                    run.save_checkpoint()
                    last_save = time.monotonic()
                if stopping:
                    raise TrainingInterrupted(f"{signal_name(signum)}: stopped after step {position.step} of "
                                              f"{run.steps}; checkpoint saved in {run.checkpoints}. Continue with: "
                                              f"{resume_command()}", signum)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(device, config.batch_size * config.max_seq_len,
                            memory_fixes(config, run.runtime, run.step.graph_shape is not None,
                                         len(decoder_layers(run.step.raw_model))),
                            f"at step {position.step + 1}", error) from None
    finally:
        bar.close()
        if run.metrics is not None:
            run.metrics.close()
    return last_loss, eval_loss, speeds


def finetune(config: FinetuneConfig) -> FinetuneResult:
    run = start_run(config)
    last_loss, eval_loss, speeds = train(run)
    exported = None
    run.step.settle()
    if run.position.step == run.steps:  # finished: the HF export (LoRA: the PEFT adapter)
        fsdp, lora = config.parallel == "fsdp2", config.lora and not config.merge_lora
        gathered = full_state_dict(run.step.raw_model, trainable_only=lora) if fsdp else None  # every rank takes part
        if run.accelerator.is_main_process:
            exported = export_final(run, gathered)
    if run.accelerator.is_main_process:
        plot_metrics(run.metrics.path, run.out / "metrics.png")
    run.accelerator.wait_for_everyone()
    tail = speeds[len(speeds) // 5:] or speeds
    run.accelerator.end_training()
    return FinetuneResult(run.position.step, last_loss, eval_loss, sum(tail) / max(len(tail), 1), run.out, exported)


def export_final(run: Run, state_dict: dict | None = None) -> Path:
    """The trained model as a plain HF checkpoint with its tokenizer (vanilla transformers / vLLM); a LoRA
    run's as a PEFT adapter folder (and, with --merge-lora, merged into output_dir/final-merged)."""
    model, tokenizer, path = run.step.raw_model, run.tokenizer, run.out / EXPORT_NAME
    if run.config.lora:
        lora = resolve_lora(run.config, run.runtime.backend, model.config)
        return export_lora(model, tokenizer, run.out, run.config, lora, run.runtime.backend, state_dict)
    if run.runtime.backend != "hf":
        return save_pretrained(model, path, tokenizer=tokenizer, state_dict=state_dict)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _log_start(config: FinetuneConfig, runtime: Runtime, report: DataReport, n_train: int, steps: int,
               position: Position) -> None:
    if runtime.backend == "hf" and config.packing:
        logger.warning("backend hf with packing: transformers keeps the packed examples apart with a full "
                       "(tokens x tokens) attention mask, correct but slow at long rows; --no-packing is how "
                       "transformers usually trains, --backend te packs without a mask")
    logger.info("te-llama finetune: model=%s backend=%s precision=%s params=%s device=%s packing=%s",
                config.model or "built-in tiny llama", runtime.backend, runtime.precision,
                str(runtime.param_dtype).removeprefix("torch."), runtime.device, config.packing)
    logger.info("data: %d rows -> %d train examples, %d tokens (%d malformed skipped, %d truncated, "
                "%d dropped too long, %d without targets); %d steps from step %d", report.rows, n_train,
                report.tokens, report.malformed_skipped, report.truncated, report.dropped_too_long,
                report.dropped_empty, steps, position.step)
