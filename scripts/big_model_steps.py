"""Full-size shapes on one GPU: build, convert to TE, train a few AdamW steps, report memory.

    python scripts/big_model_steps.py --preset llama2-7b llama3-8b --precision bf16 fp8
    python scripts/big_model_steps.py --preset llama2-7b --reload llama2-7b   # also export + load from shards

Random weights (no download). One process per (preset, precision) so memory does not carry over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.model.presets import preset_config


def run_steps(preset: str, precision: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    config = preset_config(preset)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = te_llama.convert(model, backend="te", fuse_qkv=True).train()
    build_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with te_llama.autocast(precision):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        losses.append(float(loss))
        if step >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    return {"preset": preset, "precision": precision, "batch": batch, "seq": seq,
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "build_s": round(build_s, 1),
            "median_ms": times[len(times) // 2], "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": losses[0], "last_loss": losses[-1], "gpu": torch.cuda.get_device_name()}


def export_and_reload(preset: str) -> dict:
    """save_pretrained a converted TE model, then from_pretrained it in a fresh process (host RSS)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(preset_config(preset), dtype=torch.bfloat16)
        model = te_llama.convert(model, backend="te", fuse_qkv=True)
        t0 = time.perf_counter()
        te_llama.save_pretrained(model, f"{tmp}/ckpt")
        save_s = time.perf_counter() - t0
        del model
        torch.cuda.empty_cache()
        code = (
            "import resource, time, torch, te_llama, json; t=time.perf_counter();"
            f"m=te_llama.from_pretrained('{tmp}/ckpt', backend='te', torch_dtype=torch.bfloat16, fuse_qkv=True);"
            "print(json.dumps({'load_s': time.perf_counter()-t, 'host_peak_rss_gib': "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20, "
            "'gpu_gib': torch.cuda.memory_allocated()/2**30}))"
        )
        loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
    return {"preset": preset, "save_s": round(save_s, 1), **loaded}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", nargs="+", default=["llama2-7b", "llama3-8b"])
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reload", nargs="*", default=[], metavar="PRESET",
                        help="also export these presets with save_pretrained and load them back from shards")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_steps(*args.one, args.batch, args.seq, args.steps, args.warmup)))
        return
    rows = []
    for preset in args.preset:
        for precision in args.precision:
            cmd = [sys.executable, __file__, "--one", preset, precision, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                rows.append({"preset": preset, "precision": precision, "error": proc.stderr[-2000:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        if preset in args.reload:
            print(json.dumps(export_and_reload(preset)), flush=True)
    print(f"\n{'preset':<10} {'prec':<5} {'params(B)':>9} {'ms/step':>8} {'peak GiB':>9} {'loss0':>7} {'lossN':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<10} {r['precision']:<5} ERROR {r['error'][-300:]}")
        else:
            print(f"{r['preset']:<10} {r['precision']:<5} {r['params_b']:>9.2f} {r['median_ms']:>8.1f} "
                  f"{r['peak_gib']:>9.1f} {r['first_loss']:>7.3f} {r['last_loss']:>7.3f}")


if __name__ == "__main__":
    main()
