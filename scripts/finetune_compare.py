"""`te-llama finetune` end to end against transformers as is, on an SFT-like length mix.

    python3 scripts/finetune_compare.py --preset llama3-8b --out /tmp/compare            # a GPU
    python3 scripts/finetune_compare.py --preset tiny-llama --steps 6 --max-seq-len 1024 --out /tmp/compare  # CPU

A random-weight checkpoint of the preset's shape (the built-in tokenizer), chat conversations whose
lengths follow a log-normal mix (median ~460 tokens, ~40 up to max-seq-len, like common SFT sets),
and one `te-llama finetune` process per row: te-llama's defaults, and `--backend hf --no-packing`
(transformers as is, padded batches). Useful tokens/s = real (non-pad) tokens over the time of the
steps after the warm-up, from each run's metrics.jsonl. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROWS = {
    "te-llama": [],
    "te-llama-bf16": ["--precision", "bf16"],
    "hf": ["--backend", "hf", "--no-packing"],
}
WORDS = ("the model reads tokens and learns which word follows another across many examples while the "
         "optimizer moves weights a little at every step so that held out text becomes less surprising").split()


def make_checkpoint(preset: str, folder: Path, layers: int | None = None) -> None:
    """Random weights of the preset's shape (`layers`: that many decoder layers) with the built-in tokenizer
    (BF16 on a GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from te_llama.model.builtin import builtin_tokenizer
    from te_llama.model.presets import preset_config

    tokenizer = builtin_tokenizer()
    config = preset_config(preset)
    if layers:
        config.num_hidden_layers = layers
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


TOKENS_PER_WORD = 3.7
"""The built-in tokenizer (512 entries) spends about this many tokens on each of WORDS."""


def make_chat_data(path: Path, rows: int, max_tokens: int, seed: int = 0) -> None:
    """Conversations of log-normal length: median ~400 tokens, from ~40 up to max_tokens."""
    rng = random.Random(seed)
    most = int((max_tokens - 24) / (TOKENS_PER_WORD * 1.15))  # some words take more tokens
    with path.open("w") as f:
        for _ in range(rows):
            length = min(most, max(10, int(rng.lognormvariate(math.log(400 / TOKENS_PER_WORD), 0.8))))
            question = rng.randint(3, max(4, length // 4))
            text = [rng.choice(WORDS) for _ in range(length)]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(text[:question])},
                {"role": "assistant", "content": " ".join(text[question:])}]}) + "\n")


def failure_reason(log: Path) -> str:
    """A failed run's own message: its last `te-llama:` line (the error te-llama prints) or `te-llama ...: error:`
    line (its argument parser's), else the last exception line that is not torchrun's own, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    exception = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception): ")
    own = re.compile(r"^te-llama(:| [\w-]+: error: )")
    return next((line for line in reversed(lines) if own.match(line)),
                next((line for line in reversed(lines) if exception.match(line) and "ChildFailedError" not in line),
                     lines[-1] if lines else "no output"))


def run_row(name: str, flags: list[str], args: argparse.Namespace, model: Path, data: Path) -> dict:
    out = args.out / "runs" / name
    command = [sys.executable, "-m", "te_llama", "finetune", "--model", str(model), "--data", str(data),
               "--output-dir", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-seq-len", str(args.max_seq_len), "--eval-fraction", "0", "--save-every", "0",
               "--no-tensorboard", "--overwrite", "--cache-dir", str(args.out / "cache"), *shlex.split(args.flags),
               *flags]
    log = args.out / f"{name}.log"
    with log.open("w") as f:
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"row": name, "flags": " ".join(flags) or "(defaults)", "status": status, "log": str(log)}
    if status:
        return row | {"reason": failure_reason(log)}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in steps if m["kind"] == "train" and m["step"] > args.warmup]
    seconds = sum(m["step_ms"] for m in timed) / 1000
    real = sum(m["real_tokens"] for m in timed)
    computed = sum(m["padded_tokens"] for m in timed)
    plan = next((line.split("batch size auto: ", 1)[1].split(" (")[0] for line in log.read_text().splitlines()
                 if "batch size auto: " in line and "examples per step" in line), None)
    return row | {"median_ms": statistics.median(m["step_ms"] for m in timed), "useful_tok_s": real / seconds,
                  "computed_tok_s": computed / seconds, "pad_share": 1 - real / computed,
                  "final_loss": timed[-1]["loss"], "plan": plan or f"batch {args.batch_size}",
                  "peak_reserved_gib": max((m.get("peak_reserved_gib") or 0 for m in steps), default=0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--rows", type=int, default=1500, help="conversations")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", default="auto",
                        help="examples (padded) or token budget x max-seq-len; auto: te-llama's default")
    parser.add_argument("--flags", default="", help="more finetune flags for every row, e.g. '--max-memory 75'")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--variants", nargs="+", default=["te-llama", "hf"], choices=list(ROWS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    args.out.mkdir(parents=True, exist_ok=True)
    model, data = args.out / f"model-{args.preset}", args.out / "chat.jsonl"
    if not (model / "config.json").exists():
        make_checkpoint(args.preset, model)
    make_chat_data(data, args.rows, args.max_seq_len)
    rows = [run_row(name, ROWS[name], args, model, data) for name in args.variants]
    (args.out / "compare.json").write_text(json.dumps(rows, indent=2))
    base = next((r for r in rows if r["row"] == "hf" and "useful_tok_s" in r), None)
    print(f"{args.preset}, batch {args.batch_size} x max {args.max_seq_len}, {args.steps} steps "
          f"(first {args.warmup} untimed){', flags ' + args.flags if args.flags else ''}\n")
    print("| row | flags | batch | median ms/step | useful tokens/s | pad share | peak reserved GiB | vs hf |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "useful_tok_s" not in r:
            print(f"| {r['row']} | {r['flags']} | failed (exit {r['status']}: {r['reason']}; {r['log']}) | | | | | |")
            continue
        ratio = f"{r['useful_tok_s'] / base['useful_tok_s']:.2f}x" if base else "-"
        print(f"| {r['row']} | {r['flags']} | {r['plan']} | {r['median_ms']:.1f} | {r['useful_tok_s']:,.0f} | "
              f"{r['pad_share']:.0%} | {r['peak_reserved_gib']:.1f} | {ratio} |")
    return 0 if all("useful_tok_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
