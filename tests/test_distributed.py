"""Data parallel through accelerate, 2 CPU processes on gloo (torchrun), reference backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from te_llama.metrics import read_metrics

COMMON = ["--cache-dir", "{cache}", "--no-tensorboard", "--max-steps", "6", "--max-seq-len", "64",
          "--batch-size", "4", "--eval-every", "3", "--save-every", "3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finetune(tmp_path, out: str, processes: int, *flags: str) -> dict[int, float]:
    args = ["-m", "te_llama", "finetune", "--output-dir", str(tmp_path / out),
            *[a.format(cache=tmp_path / "cache") for a in COMMON], *flags]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(tmp_path / out / "metrics.jsonl") if r["kind"] == "train"}


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path) -> None:
    single = finetune(tmp_path, "single", 1, "--grad-accum", "2")
    data_parallel = finetune(tmp_path, "ddp", 2, "--grad-accum", "1")
    assert sorted(data_parallel) == list(range(1, 7))
    for step, loss in single.items():
        assert data_parallel[step] == pytest.approx(loss, rel=1e-5), step


def test_resume_with_a_different_number_of_processes(tmp_path) -> None:
    single = finetune(tmp_path, "single", 1, "--grad-accum", "2")
    finetune(tmp_path, "moved", 2, "--grad-accum", "1", "--stop-after-steps", "3")
    resumed = finetune(tmp_path, "moved", 1, "--grad-accum", "2", "--resume")  # same global batch
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step
