"""`--batch-size auto` on the GPU: under a memory cap the planner splits the batch as its own probes say, and
the run it plans trains to the end within the cap."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import te_unavailable_reason
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.model.builtin import builtin_tokenizer
from te_llama.model.presets import preset_config
from te_llama.precision import auto_precision
from te_llama.train.batch_plan import HEADROOM_BYTES, HEADROOM_SHARE, probe_peak
from te_llama.train.config import FinetuneConfig
from te_llama.train.step import Runtime

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(te_unavailable_reason() is not None,
                                                  reason=te_unavailable_reason() or "")]

SEQ = 2048
PRESET = "qwen3-0.6b"  # 28 layers: activations of 8 x 2,048 tokens are far larger than of 2 x 2,048


def test_auto_splits_the_batch_under_a_cap_and_the_run_fits_it(tmp_path) -> None:
    folder = tmp_path / "model"
    tokenizer, config = builtin_tokenizer(), preset_config(PRESET)
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    precision, _ = auto_precision(True, "te")
    runtime = Runtime(torch.device("cuda"), "te", precision, torch.bfloat16)
    model = te_llama.from_pretrained(folder, backend="te", torch_dtype=torch.bfloat16, device="cuda",
                                     fuse_qkv=True).train()
    probe = functools.partial(probe_peak, model, FinetuneConfig(max_seq_len=SEQ), runtime, fused_loss=True,
                              with_cu_seqlens=True, pad_token_id=0)
    probe(1)  # the first pass of a process warms up, as the planner's does
    held = torch.cuda.memory_allocated()
    one, two, four = probe(1), probe(2), probe(4)
    assert one <= two < four
    state = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    # the planner fits a micro-batch within: cap - what is allocated - state - headroom (2 GiB + 5% of the cap);
    # a cap that leaves it halfway between what 2 and 4 examples took here
    cap_gib = (held + state + HEADROOM_BYTES + (two + four) / 2) / (1 - HEADROOM_SHARE) / 2**30
    out = tmp_path / "run"
    command = [sys.executable, "-m", "te_llama", "finetune", "--model", str(folder), "--output-dir", str(out),
               "--max-seq-len", str(SEQ), "--max-steps", "3", "--eval-fraction", "0", "--save-every", "0",
               "--no-tensorboard", "--cache-dir", str(tmp_path / "cache"), "--max-memory", f"{cap_gib:.2f}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 4 micro-batches of 2 (4,096 tokens each" in done.stderr, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "train"]) == 3
