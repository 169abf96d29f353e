"""Throughput of `te-llama finetune` on 1 and N GPUs: the same model, data and per-GPU batch.

    python3 scripts/scaling.py --preset llama2-7b --batch 8 --seq 256 --out /tmp/scaling         # 1 and 2 GPUs, DDP
    python3 scripts/scaling.py --preset llama3-8b --batch 1 --seq 8192 --precision fp8-delayed-fastacc bf16 \\
        --out /tmp/scaling                                                     # FP8 and BF16 on 1 and 2 GPUs
    python3 scripts/scaling.py --model ckpt/ --parallel ddp fsdp2 --best-single= --out /tmp/scaling
    python3 scripts/scaling.py --preset tiny-llama --precision fp32 --batch 2 --seq 64 --steps 4 --warmup 1 \\
        --out /tmp/scaling                                                                     # CPU: processes

Each row is one `torchrun --standalone --nproc-per-node N -m te_llama finetune` subprocess, run one
after the other: one GPU (a single process: te-llama's one-GPU speed features), then N GPUs per
--parallel mode. Every GPU takes a micro-batch of --batch x --seq tokens per step, so N GPUs train
on an N times larger global batch (weak scaling). Useful tokens/s = real (non-pad) tokens of every
GPU over the time of the steps after --warmup, from each run's metrics.jsonl; peak memory is the
fullest GPU's. Efficiency = tokens/s / (GPUs x the one-GPU row's tokens/s in the same precision);
"vs best single" = tokens/s / (GPUs x the fastest one-GPU row's), over every --precision and the
--best-single row (finetune flags; empty: te-llama's one-GPU defaults, FP8 on FP8 GPUs).

Each --precision (default bf16) runs every GPU count: `auto` resolves to FP8 on one FP8 GPU but to
BF16 on several, which would compare precisions, not GPU counts. NVLink multicast stays off in every run
(NCCL_NVLS_ENABLE=0). --preset builds a random-weight checkpoint of that shape with the built-in
tokenizer; without --data the runs train on generated chat conversations (scripts/finetune_compare.py).
On a machine without GPUs the runs are CPU processes on gloo (a pipeline check, not a measurement).
Writes scaling.json, scaling.md, each run's log and output folder under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPTS = Path(__file__).parent
sys.path.insert(0, str(SCRIPTS))
from finetune_compare import failure_reason, make_chat_data  # noqa: E402

PARALLEL_MODES = ("ddp", "fsdp2")
NO_NVLS = {"NCCL_NVLS_ENABLE": "0"}
"""NVLink multicast (NVLS) off in every run: our machines must not use it."""
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""What torchrun sets for several processes, set for one too (unless OMP_NUM_THREADS is given): every row
runs with the same host threads."""


@dataclass
class Row:
    name: str
    gpus: int
    parallel: str
    """"single" (one process), "ddp" or "fsdp2"."""
    flags: list[str]
    status: str = "not run"
    precision: str | None = None
    """What the run trained in (its run_config.json; auto resolved)."""
    tokens_per_s: float | None = None
    median_step_ms: float | None = None
    efficiency: float | None = None
    efficiency_vs_best_single: float | None = None
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    final_loss: float | None = None
    log: str | None = None


def preset_checkpoint(preset: str, folder: Path, layers: int | None = None) -> None:
    """finetune_compare's random-weight checkpoint, built in a child process: this one must hold no GPU
    memory (nor a CUDA context) while the runs measure."""
    code = (f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); from pathlib import Path; "
            f"from finetune_compare import make_checkpoint; make_checkpoint({preset!r}, Path({str(folder)!r}), {layers!r})")
    subprocess.run([sys.executable, "-c", code], check=True)


def plan(args: argparse.Namespace) -> list[Row]:
    rows = []
    for precision in args.precision:
        tail = f"-{precision}" if len(args.precision) > 1 else ""
        for gpus in args.gpus:
            if gpus == 1:
                rows.append(Row(f"1-gpu{tail}", 1, "single", ["--precision", precision]))
            else:
                rows += [Row(f"{gpus}-gpu-{mode}{tail}", gpus, mode, ["--precision", precision, "--parallel", mode])
                         for mode in args.parallel]
    if args.best_single is not None:
        rows.append(Row("best-single", 1, "single", shlex.split(args.best_single)))
    return rows


def run(row: Row, args: argparse.Namespace, model: str, data: Path) -> Row:
    out = args.out / "runs" / row.name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(row.gpus),
               "-m", "te_llama", "finetune", "--model", model, "--data", str(data), "--output-dir", str(out),
               "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--max-seq-len", str(args.seq),
               "--eval-fraction", "0", "--save-every", "0", "--no-tensorboard", "--overwrite",
               "--cache-dir", str(args.out / "cache"), *shlex.split(args.flags), *row.flags]
    log = args.out / f"{row.name}.log"
    row.log = str(log)
    print(f"{row.name}: {shlex.join(command)}", flush=True)
    with log.open("w") as handle:
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  env=ONE_THREAD | os.environ | NO_NVLS, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            row.status = f"timed out after {args.timeout} s"
            return row
    if code:
        row.status = f"failed (exit {code}: {failure_reason(log)})"
        return row
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [m for m in metrics if m["kind"] == "train" and m["step"] > args.warmup]
    seconds = sum(m["step_ms"] for m in timed) / 1000
    row.tokens_per_s = sum(m["real_tokens"] for m in timed) / seconds
    row.median_step_ms = statistics.median(m["step_ms"] for m in timed)
    row.final_loss = timed[-1]["loss"]
    peaks = [m for m in metrics if "peak_reserved_gib" in m]
    if peaks:
        row.peak_allocated_gib = max(m["peak_allocated_gib"] for m in peaks)
        row.peak_reserved_gib = max(m["peak_reserved_gib"] for m in peaks)
    row.precision = json.loads((out / "run_config.json").read_text())["resolved"]["precision"]
    row.status = "ok"
    return row


def add_efficiency(rows: list[Row]) -> None:
    """Each row's tokens/s against GPUs x the one-GPU row's of its precision (the same flags but the GPU
    count), and against GPUs x the best single's: the fastest one-GPU row of any precision or flags."""
    singles = [r for r in rows if r.gpus == 1 and r.tokens_per_s]
    one = {r.flags[1]: r for r in singles if r.name != "best-single"}  # by --precision
    best = max(singles, key=lambda r: r.tokens_per_s) if len(singles) > 1 or any(
        r.name == "best-single" for r in singles) else None
    for row in rows:
        if row.tokens_per_s is None:
            continue
        if row.name != "best-single" and row.flags[1] in one:
            row.efficiency = row.tokens_per_s / (row.gpus * one[row.flags[1]].tokens_per_s)
        if best is not None:
            row.efficiency_vs_best_single = row.tokens_per_s / (row.gpus * best.tokens_per_s)


def markdown(rows: list[Row], args: argparse.Namespace, source: str) -> str:
    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [f"`te-llama finetune` scaling: {source}, {args.batch} x {args.seq} tokens per GPU and step, "
             f"{args.steps} steps (first {args.warmup} untimed)", "",
             "| GPUs | parallel | precision | useful tokens/s | median ms/step | efficiency | vs best single "
             "| peak allocated GiB/GPU | peak reserved GiB/GPU | flags | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.gpus} | {r.parallel} | {r.precision or '-'} | {number(r.tokens_per_s, ',.0f')} | "
                     f"{number(r.median_step_ms, '.1f')} | {number(r.efficiency, '.1%')} | "
                     f"{number(r.efficiency_vs_best_single, '.1%')} | {number(r.peak_allocated_gib, '.1f')} | "
                     f"{number(r.peak_reserved_gib, '.1f')} | `{shlex.join(r.flags) or '(defaults)'}` | {r.status} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in model shape (te_llama.model.presets), random weights")
    source.add_argument("--model", help="an HF checkpoint folder (or Hub id)")
    parser.add_argument("--layers", type=int, help="with --preset: that many decoder layers (memory per layer of "
                        "a model too large for the GPUs at hand)")
    parser.add_argument("--data", type=Path, help="training data (default: generated chat conversations)")
    parser.add_argument("--rows", type=int, default=2000, help="generated conversations, without --data")
    parser.add_argument("--batch", type=int, default=8, help="--batch-size per GPU (packing: token budget / --seq)")
    parser.add_argument("--seq", type=int, default=256, help="--max-seq-len")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to run (1 = one process)")
    parser.add_argument("--parallel", nargs="+", default=["ddp"], choices=PARALLEL_MODES,
                        help="modes of the runs on several GPUs")
    parser.add_argument("--precision", nargs="+", default=["bf16"],
                        help="--precision of the runs: every GPU count runs in each (efficiency within a precision)")
    parser.add_argument("--best-single", metavar="FLAGS",
                        help="also run one GPU with these finetune flags and compare against it "
                             "(--best-single= for te-llama's one-GPU defaults)")
    parser.add_argument("--flags", default="", metavar="FLAGS",
                        help="finetune flags every run gets (e.g. --flags=--no-cuda-graphs)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    if any(n < 1 for n in args.gpus):
        parser.error(f"--gpus {args.gpus}: every count must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.preset:
        folder = args.out / (f"model-{args.preset}" + (f"-{args.layers}-layers" if args.layers else ""))
        if not (folder / "config.json").exists():
            preset_checkpoint(args.preset, folder, args.layers)
        model = str(folder)
    data = args.data
    if data is None:
        data = args.out / "chat.jsonl"
        make_chat_data(data, args.rows, args.seq)
    rows = plan(args)
    for row in rows:
        run(row, args, model, data)
        add_efficiency(rows)
        (args.out / "scaling.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        (args.out / "scaling.md").write_text(markdown(rows, args, args.preset or args.model))
    print(markdown(rows, args, args.preset or args.model))
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
