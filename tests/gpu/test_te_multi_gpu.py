"""Two GPUs: `te-llama finetune` on 2 GPUs (DDP, FSDP2) against one GPU. Each run is a torchrun subprocess; NVLink multicast stays off (NCCL_NVLS_ENABLE=0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import te_unavailable_reason

from te_llama.train.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(te_unavailable_reason() is not None, reason=te_unavailable_reason() or ""),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs 2 GPUs, {torch.cuda.device_count()} visible"),
]

ENV = os.environ | {"NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                   os.environ.get("PYTHONPATH", "")])}
# One GPU with 2 micro-batches against 2 GPUs with one each: the same math, reduced in another order
# in BF16, over 12 steps of the built-in model.
FINAL_LOSS_REL = 1e-2
EXPORT_REL_L2 = 1e-2  # 12 BF16 AdamW steps from the same start, reduced in another order


def torchrun(*args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


FINETUNE = ["-m", "te_llama", "finetune", "--backend", "te", "--precision", "bf16", "--max-steps", "12",
            "--eval-fraction", "0", "--save-every", "0", "--no-tensorboard"]


def finetune_losses(tmp_path: Path, name: str, processes: int, *flags: str) -> tuple[dict[int, float], str]:
    """`te-llama finetune` (built-in model and data) on `processes` GPUs: its train losses and its log."""
    args = [*FINETUNE, "--output-dir", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"), *flags]
    proc = torchrun(*args, processes=processes)
    rows = read_metrics(tmp_path / name / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}, proc.stderr


def test_finetune_on_two_gpus_matches_one_gpu(tmp_path, record_metric) -> None:
    """The defaults on 2 GPUs, DDP (CUDA graphs of the layers) and FSDP2 (eager layers), both with the
    fused loss, against one GPU (eager) with 2 micro-batches per step: the same global batch."""
    one, _ = finetune_losses(tmp_path, "one", 1, "--grad-accum", "2", "--no-cuda-graphs")
    ddp, ddp_log = finetune_losses(tmp_path, "ddp", 2)
    fsdp2, fsdp2_log = finetune_losses(tmp_path, "fsdp2", 2, "--parallel", "fsdp2")
    assert "fused loss off" not in ddp_log + fsdp2_log
    assert "captured CUDA graphs" in ddp_log and "cuda graphs off" not in ddp_log
    assert "cuda graphs off: FSDP2" in fsdp2_log
    gaps = {name: abs(got[12] - one[12]) / one[12] for name, got in (("ddp", ddp), ("fsdp2", fsdp2))}
    record_metric(one_gpu=one, ddp=ddp, fsdp2=fsdp2, final_loss_rel_gap=gaps)
    assert sorted(ddp) == sorted(fsdp2) == list(range(1, 13))
    assert all(gap <= FINAL_LOSS_REL for gap in gaps.values()), gaps


def test_sharded_checkpoint_moves_between_one_and_two_gpus(tmp_path, record_metric) -> None:
    """An FSDP2 run stopped at step 6 on 2 GPUs (a sharded DCP checkpoint) resumes on 1 (2 micro-batches: the
    same global batch), and the reverse; both continue the uninterrupted one-GPU run's losses and export its
    weights (BF16 tolerance). DDP's full checkpoints move the same way (tests/test_distributed.py, CPU)."""
    flags = ["--save-every", "6", "--parallel", "fsdp2", "--no-cuda-graphs"]
    one, _ = finetune_losses(tmp_path, "one", 1, "--grad-accum", "2", *flags)
    runs = {"2-to-1": (2, 1), "1-to-2": (1, 2)}
    for name, (first, then) in runs.items():
        finetune_losses(tmp_path, name, first, "--grad-accum", str(3 - first), "--stop-after-steps", "6", *flags)
        finetune_losses(tmp_path, name, then, "--grad-accum", str(3 - then), "--resume", *flags)
    got = {name: {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                  if r["kind"] == "train"} for name in runs}
    record_metric(one_gpu=one, **got)
    from transformers import AutoModelForCausalLM

    want = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    for name in runs:
        assert sorted(got[name]) == list(range(1, 13)), name
        for step in range(7, 13):
            assert got[name][step] == pytest.approx(one[step], rel=FINAL_LOSS_REL), (name, step)
        weights = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict()
        for key, tensor in want.items():
            gap = float((weights[key].float() - tensor.float()).norm() / tensor.float().norm())
            assert gap <= EXPORT_REL_L2, (name, key, gap)
