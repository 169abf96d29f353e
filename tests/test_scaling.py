"""scripts/scaling.py on the CPU: 1 and 2 gloo processes of `te-llama finetune` on the tiny preset."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "scaling.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scaling", module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts scripts/ on it
    spec.loader.exec_module(module)
    return module


def test_scaling_runs_one_and_two_processes_and_reports_their_efficiency(tmp_path) -> None:
    out = tmp_path / "scaling"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny-llama", "--precision", "fp32",
                           "--batch", "2", "--seq", "64", "--steps", "4", "--warmup", "1", "--rows", "200",
                           "--parallel", "ddp", "fsdp2", "--best-single=", "--layers", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "scaling.json").read_text())
    assert json.loads((out / "model-tiny-llama-2-layers" / "config.json").read_text())["num_hidden_layers"] == 2
    assert [(r["gpus"], r["parallel"], r["status"]) for r in rows] == [
        (1, "single", "ok"), (2, "ddp", "ok"), (2, "fsdp2", "ok"), (1, "single", "ok")]
    assert [r["precision"] for r in rows] == ["fp32"] * 4  # the best single's auto resolved to fp32 on a CPU
    one, best = rows[0]["tokens_per_s"], max(rows[0]["tokens_per_s"], rows[3]["tokens_per_s"])  # the faster single
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_reserved_gib"] is None  # no GPU memory on a CPU
        if row["name"] != "best-single":  # its own flags: no one-GPU row of the same precision
            assert row["efficiency"] == pytest.approx(row["tokens_per_s"] / (row["gpus"] * one))
        assert row["efficiency_vs_best_single"] == pytest.approx(row["tokens_per_s"] / (row["gpus"] * best))
    # the same model and data, each run trained on its own global batch: 2 processes see twice the tokens
    metrics = {r["name"]: [json.loads(line) for line in (out / "runs" / r["name"] / "metrics.jsonl").open()]
               for r in rows}
    assert sum(m["real_tokens"] for m in metrics["2-gpu-ddp"]) > sum(m["real_tokens"] for m in metrics["1-gpu"])
    table = (out / "scaling.md").read_text()
    assert "| GPUs | parallel | precision | useful tokens/s |" in table and table in proc.stdout


def test_every_run_is_torchrun_with_nvlink_multicast_off(tmp_path, monkeypatch) -> None:
    scaling = load_script(monkeypatch)
    calls = []

    def fake_run(command, env, stdout, **kwargs):
        calls.append((command, env))
        stdout.write("loading\nte-llama: error: out of GPU memory at step 1\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(scaling.subprocess, "run", fake_run)
    args = scaling.argparse.Namespace(out=tmp_path, steps=3, batch=2, seq=64, timeout=10, warmup=1, gpus=[1, 2],
                                      parallel=["fsdp2"], precision=["bf16"], best_single="--precision fp8",
                                      flags="--no-cuda-graphs")
    rows = scaling.plan(args)
    for row in rows:
        scaling.run(row, args, "ckpt", tmp_path / "data.jsonl")
    assert [row.status for row in rows] == ["failed (exit 1: te-llama: error: out of GPU memory at step 1)"] * 3
    for (command, env), processes, flags in zip(calls, ["1", "2", "1"], [
            ["--precision", "bf16"], ["--precision", "bf16", "--parallel", "fsdp2"], ["--precision", "fp8"]]):
        assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", processes]
        assert command[6:9] == ["-m", "te_llama", "finetune"] and command[-len(flags):] == flags
        assert command[-len(flags) - 1] == "--no-cuda-graphs"  # --flags: every run's
        assert env["NCCL_NVLS_ENABLE"] == "0"


def test_each_precision_runs_every_gpu_count_and_the_best_single_is_the_fastest_one_gpu_row(monkeypatch) -> None:
    scaling = load_script(monkeypatch)
    args = scaling.argparse.Namespace(gpus=[1, 2], parallel=["ddp"], precision=["fp8", "bf16"], best_single=None)
    rows = scaling.plan(args)
    assert [(r.name, r.flags) for r in rows] == [
        ("1-gpu-fp8", ["--precision", "fp8"]), ("2-gpu-ddp-fp8", ["--precision", "fp8", "--parallel", "ddp"]),
        ("1-gpu-bf16", ["--precision", "bf16"]), ("2-gpu-ddp-bf16", ["--precision", "bf16", "--parallel", "ddp"])]
    for row, speed in zip(rows, [1500.0, 2700.0, 1000.0, 1900.0]):
        row.tokens_per_s = speed
    scaling.add_efficiency(rows)
    assert [r.efficiency for r in rows] == pytest.approx([1.0, 0.9, 1.0, 0.95])  # within each precision
    assert [r.efficiency_vs_best_single for r in rows] == pytest.approx([1.0, 0.9, 1000 / 1500, 1900 / 3000])


@pytest.mark.parametrize(("tail", "want"), [
    (["[rank0]: Traceback (most recent call last):", "[rank0]: ValueError: Size mismatch for x._extra_state"],
     "[rank0]: ValueError: Size mismatch for x._extra_state"),
    (["te-llama finetune: error: ambiguous option: --lora could match --lora-rank"],
     "te-llama finetune: error: ambiguous option: --lora could match --lora-rank")])
def test_a_failed_run_is_reported_by_its_own_error_not_torchruns_banner(tmp_path, monkeypatch, tail, want) -> None:
    scaling = load_script(monkeypatch)
    log = tmp_path / "run.log"
    log.write_text("\n".join(["te-llama finetune: model=/m backend=te precision=fp8", *tail,
                              "Traceback (most recent call last):",
                              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "=" * 60]))
    assert scaling.failure_reason(log) == want
