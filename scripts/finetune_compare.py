"""Device run for the finetune issue: the same finetune job, TE vs HF, packing vs padding.

    python3 scripts/finetune_compare.py --preset llama2-7b --steps 40

Makes a random-weight HF checkpoint of the preset (with the built-in tokenizer), a JSONL of
variable-length documents (64-1024 tokens, like SFT data), then runs `te-llama finetune` once
per variant, each in its own process, and prints useful (non-pad) tokens/s side by side.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from te_llama.model.builtin import builtin_tokenizer
from te_llama.train.metrics import read_metrics
from te_llama.model.presets import preset_config

VARIANTS = {  # name: te-llama finetune flags
    "hf-bf16-padding": ["--backend", "hf", "--precision", "bf16", "--no-packing"],
    "te-bf16-padding": ["--backend", "te", "--precision", "bf16", "--no-packing"],
    "te-bf16-packing": ["--backend", "te", "--precision", "bf16", "--packing"],
    "te-fp8-packing": ["--backend", "te", "--precision", "fp8", "--packing"],
}
WORDS = "the sum of and is product colour sky blue after comes before one two three four five".split()


def make_checkpoint(preset: str, path: Path) -> None:
    tokenizer = builtin_tokenizer()
    config = preset_config(preset)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            words = rng.randint(40, 700)  # ~1.4 tokens/word with the built-in tokenizer
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--work", default="/tmp/te-llama-finetune")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, data = work / "model", work / "data.jsonl"
    if not ckpt.exists():
        make_checkpoint(args.preset, ckpt)
    make_data(data, rows=2000)
    rows = []
    for name in args.variants:
        run_dir = work / name
        cmd = [sys.executable, "-m", "te_llama", "finetune", "--model", str(ckpt), "--data", str(data),
               "--output-dir", str(run_dir), "--overwrite", "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
               "--learning-rate", "1e-5", "--eval-fraction", "0", "--save-every", "0",
               "--cache-dir", str(work / "cache"), "--no-tensorboard", *VARIANTS[name]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            rows.append({"variant": name, "error": (proc.stdout + proc.stderr)[-1500:]})
        else:
            train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
            timed = train[5:]  # first steps warm up (allocator, cuDNN plans, FP8 scales)
            ms = sorted(r["step_ms"] for r in timed)
            useful = sum(r["real_tokens"] for r in timed) / sum(r["step_ms"] / 1000 for r in timed)
            computed = sum(r["padded_tokens"] for r in timed) / sum(r["step_ms"] / 1000 for r in timed)
            rows.append({"variant": name, "median_step_ms": ms[len(ms) // 2], "useful_tok_s": useful,
                         "computed_tok_s": computed, "tokens_per_step": timed[0]["real_tokens"],
                         "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
                         "exported": (run_dir / "final" / "config.json").exists()})
            shutil.rmtree(run_dir / "final", ignore_errors=True)  # 13 GB each; keep the disk free
        print(json.dumps(rows[-1]), flush=True)
    (out / "finetune_compare.json").write_text(json.dumps(rows, indent=2))
    base = next((r["useful_tok_s"] for r in rows if r["variant"] == "hf-bf16-padding" and "error" not in r), None)
    print(f"\n{'variant':<18} {'ms/step':>8} {'useful tok/s':>13} {'vs hf':>6} {'loss 1 -> N':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<18} ERROR")
            continue
        ratio = f"{r['useful_tok_s'] / base:.2f}x" if base else "-"
        print(f"{r['variant']:<18} {r['median_step_ms']:>8.1f} {r['useful_tok_s']:>13,.0f} {ratio:>6} "
              f"{r['first_loss']:>7.3f} -> {r['last_loss']:.3f}")


if __name__ == "__main__":
    main()
