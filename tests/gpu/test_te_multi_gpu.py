"""Two GPUs: DDP with CUDA graphs against DDP eager, and `te-llama finetune` on 2 GPUs (DDP, FSDP2)
against one GPU. Each run is a torchrun subprocess; NVLink multicast stays off (NCCL_NVLS_ENABLE=0)."""

from __future__ import annotations

import json
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

WORKER = Path(__file__).parent / "ddp_worker.py"
ENV = os.environ | {"NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                   os.environ.get("PYTHONPATH", "")])}
# Under DDP as in one process, a graph replays the kernels eager mode launches on the same inputs:
# losses and weights may differ only by kernel choices (tests/gpu/test_te_cuda_graphs.py's bounds).
GRAPH_LOSS_REL = {"bf16": 2e-3, "fp8": 5e-3}
GRAPH_PARAM_REL_L2 = {"bf16": 1e-2, "fp8": 2e-2}
# One GPU with 2 micro-batches against 2 GPUs with one each: the same math, reduced in another order
# in BF16 (and padded rows only where graphs run), over 12 steps of the built-in model.
FINAL_LOSS_REL = 1e-2


def torchrun(*args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


CASES = [  # (arch, precision, fuse_qkv, grad_accum)
    ("llama3.1-gqa-llama3-rope", "bf16", True, 1),
    ("llama3.1-gqa-llama3-rope", "bf16", True, 2),
    ("mistral-gqa", "bf16", False, 1),  # split Q/K/V
    ("llama3.1-gqa-llama3-rope", "fp8", True, 1),
]


@pytest.mark.parametrize(("arch", "precision", "fuse_qkv", "grad_accum"), CASES,
                         ids=[f"{a}-{p}-{'fused' if f else 'split'}-accum{g}" for a, p, f, g in CASES])
def test_ddp_with_cuda_graphs_trains_like_ddp_eager(tmp_path, arch: str, precision: str, fuse_qkv: bool,
                                                     grad_accum: int, record_metric) -> None:
    """The graphed layers return their weight gradients through autograd, so DDP's hooks all-reduce them:
    both replicas stay identical, and training equals eager DDP up to kernel choices."""
    out = tmp_path / "result.json"
    torchrun(str(WORKER), json.dumps({"arch": arch, "precision": precision, "fuse_qkv": fuse_qkv,
                                      "grad_accum": grad_accum, "out": str(out)}))
    result = json.loads(out.read_text())
    want, got = result["eager_losses"], result["graphs_losses"]
    loss_gap = max(abs(g - w) / w for g, w in zip(got, want))
    record_metric(arch=arch, precision=precision, fuse_qkv=fuse_qkv, grad_accum=grad_accum, eager_losses=want,
                  graphed_losses=got, max_loss_rel_gap=loss_gap, max_param_rel_l2=result["max_param_rel_l2"])
    assert result["world"] == 2 and result["ddp"] == {"eager": True, "graphs": True}
    assert result["graphs_captured"] and result["eager_batches"] == 0
    assert not result["grads_written_in_place"]  # DDP's all-reduce starts from autograd's hooks
    assert result["eager_replicas_identical"] and result["graphs_replicas_identical"]
    family = "bf16" if precision == "bf16" else "fp8"
    assert loss_gap <= GRAPH_LOSS_REL[family]
    assert result["max_param_rel_l2"] <= GRAPH_PARAM_REL_L2[family]


FINETUNE = ["-m", "te_llama", "finetune", "--backend", "te", "--precision", "bf16", "--max-steps", "12",
            "--eval-fraction", "0", "--save-every", "0", "--no-tensorboard"]


def finetune_losses(tmp_path: Path, name: str, processes: int, *flags: str) -> tuple[dict[int, float], str]:
    """`te-llama finetune` (built-in model and data) on `processes` GPUs: its train losses and its log."""
    args = [*FINETUNE, "--output-dir", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"), *flags]
    proc = torchrun(*args, processes=processes)
    rows = read_metrics(tmp_path / name / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}, proc.stderr


def test_finetune_on_two_gpus_matches_one_gpu(tmp_path, record_metric) -> None:
    """The defaults on 2 GPUs: DDP with CUDA graphs and the fused loss; FSDP2 with the fused loss (eager).
    Each against one GPU with 2 micro-batches per step, the same global batch."""
    one_graphs, _ = finetune_losses(tmp_path, "one-graphs", 1, "--grad-accum", "2")
    one_eager, _ = finetune_losses(tmp_path, "one-eager", 1, "--grad-accum", "2", "--no-cuda-graphs")
    ddp, ddp_log = finetune_losses(tmp_path, "ddp", 2)
    fsdp2, fsdp2_log = finetune_losses(tmp_path, "fsdp2", 2, "--parallel", "fsdp2")
    assert "captured CUDA graphs" in ddp_log and "does not fit the CUDA graphs" not in ddp_log
    assert "fused loss off" not in ddp_log + fsdp2_log
    assert "cuda graphs off: FSDP2" in fsdp2_log
    gaps = {name: abs(got[12] - want[12]) / want[12]
            for name, got, want in (("ddp", ddp, one_graphs), ("fsdp2", fsdp2, one_eager))}
    record_metric(one_gpu_graphs=one_graphs, one_gpu_eager=one_eager, ddp=ddp, fsdp2=fsdp2, final_loss_rel_gap=gaps)
    assert sorted(ddp) == sorted(fsdp2) == list(range(1, 13))
    assert all(gap <= FINAL_LOSS_REL for gap in gaps.values()), gaps
