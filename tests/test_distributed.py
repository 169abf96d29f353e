"""Several CPU processes on gloo (torchrun), reference backend: DDP through accelerate, FSDP2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from te_llama.train.metrics import read_metrics

# Every run computes the fused loss (te_llama.train.loss, auto: on), in one process and in several.
COMMON = ["--cache-dir", "{cache}", "--no-tensorboard", "--max-steps", "6", "--max-seq-len", "64",
          "--batch-size", "4", "--eval-every", "3", "--save-every", "3"]
FUSED_VS_HF_LOSS_REL = 1e-5  # the same FP32 math in another order (tests/test_fused_loss.py), over 6 steps
FUSED_VS_HF_WEIGHTS_REL_L2 = 1e-4  # AdamW normalizes away the scale of those last bits: 2.8e-5 measured


def finetune(tmp_path, out: str, processes: int, *flags: str, launcher: bool = False) -> dict[int, float]:
    args = ["-m", "te_llama", "finetune", "--output-dir", str(tmp_path / out),
            *[a.format(cache=tmp_path / "cache") for a in COMMON], *flags]
    if processes > 1 or launcher:
        # --standalone: torchrun binds a free port itself (no race with other jobs for a port picked here)
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(tmp_path / out / "metrics.jsonl") if r["kind"] == "train"}


def exported(tmp_path, out: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tmp_path / out / "final").state_dict()


def test_ddp_with_the_fused_loss_matches_one_process_bit_for_bit(tmp_path) -> None:
    """DDP wraps the fused loss's LossModel, so its reducer sees every gradient the fused loss makes, the
    lm_head's included. Without clipping 2 replicas compute the very FP32 numbers of one process with 2
    micro-batches: each rank runs the same kernels on the same micro-batch, and DDP's halving while it
    copies a gradient into its bucket, then the sum of two, equals the accumulated g1 / 2 + g2 / 2 exactly."""
    single = finetune(tmp_path, "single", 1, "--grad-accum", "2", "--fused-loss")
    data_parallel = finetune(tmp_path, "ddp", 2, "--grad-accum", "1", "--fused-loss")
    assert sorted(data_parallel) == list(range(1, 7))
    assert data_parallel == single
    want, got = exported(tmp_path, "single"), exported(tmp_path, "ddp")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_fused_loss_in_two_processes_trains_like_transformers_loss(tmp_path, parallel: str) -> None:
    fused = finetune(tmp_path, "fused", 2, "--parallel", parallel, "--fused-loss")
    plain = finetune(tmp_path, "plain", 2, "--parallel", parallel, "--no-fused-loss")
    assert fused == pytest.approx(plain, rel=FUSED_VS_HF_LOSS_REL)
    want, got = exported(tmp_path, "plain"), exported(tmp_path, "fused")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert float((got[name] - tensor).norm() / tensor.norm()) <= FUSED_VS_HF_WEIGHTS_REL_L2, name


def test_resume_with_a_different_number_of_processes(tmp_path) -> None:
    single = finetune(tmp_path, "single", 1, "--grad-accum", "2")
    finetune(tmp_path, "moved", 2, "--grad-accum", "1", "--stop-after-steps", "3")
    resumed = finetune(tmp_path, "moved", 1, "--grad-accum", "2", "--resume")  # same global batch
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step


def test_fsdp2_matches_one_process_and_exports_one_hf_checkpoint(tmp_path) -> None:
    """Without clipping, 2 FSDP2 ranks compute the very same FP32 numbers as one process with 2
    micro-batches: each rank's gradient is the same kernels on the same micro-batch, and the
    reduce-scatter's (g1 + g2) / 2 equals the accumulated g1 / 2 + g2 / 2 exactly (halving is exact).
    So the exported weights must be bit-identical. Clipping breaks that without any error in the
    sharding: the global norm is summed in another order across shards, its last bit moves the
    clip coefficient, and AdamW's per-element normalization turns that into weight differences
    whose size no FP32 bound fixes. Clipped runs are compared by their losses below."""
    import te_llama
    from te_llama.model.builtin import builtin_model, builtin_tokenizer
    from te_llama.train.parallel import DataOnlyReader

    single = finetune(tmp_path, "single", 1, "--grad-accum", "2", "--max-grad-norm", "0")
    sharded = finetune(tmp_path, "fsdp2", 2, "--grad-accum", "1", "--parallel", "fsdp2", "--max-grad-norm", "0")
    assert sharded == single
    checkpoint = tmp_path / "fsdp2" / "checkpoints" / "step-00000006"
    assert len(list(checkpoint.glob("*.distcp"))) == 2  # one per rank
    # FSDP2's root is the fused loss's LossModel; the checkpoint still holds the model's own names
    names = te_llama.convert(builtin_model(builtin_tokenizer()), backend="reference", fuse_qkv=True).state_dict()
    held = {key for key in DataOnlyReader(checkpoint).read_metadata().state_dict_metadata if key.startswith("model.")}
    assert held == {f"model.{name}" for name in names}
    want, got = exported(tmp_path, "single"), exported(tmp_path, "fsdp2")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_fsdp2_resumes_sharded_checkpoint_on_another_process_count(tmp_path) -> None:
    single = finetune(tmp_path, "single", 1, "--grad-accum", "2")
    finetune(tmp_path, "moved", 2, "--grad-accum", "1", "--parallel", "fsdp2", "--stop-after-steps", "3")
    resumed = finetune(tmp_path, "moved", 1, "--grad-accum", "2", "--parallel", "fsdp2", "--resume", launcher=True)
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step


def test_fsdp2_with_activation_checkpointing(tmp_path) -> None:
    plain = finetune(tmp_path, "plain", 2, "--parallel", "fsdp2")
    recomputed = finetune(tmp_path, "ac", 2, "--parallel", "fsdp2", "--activation-checkpointing")
    assert recomputed == pytest.approx(plain, rel=1e-5)


def test_fsdp2_without_a_distributed_launch_is_a_clear_error(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "te_llama", "finetune", "--output-dir", str(tmp_path / "x"),
                           "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--parallel", "fsdp2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "te-llama: error: --parallel fsdp2 needs a distributed launch" in proc.stderr


def test_fsdp2_lora_matches_one_process_and_resumes_its_sharded_adapters(tmp_path) -> None:
    """LoRA under FSDP2: the frozen base is sharded but never trained; the checkpoints hold the adapters and
    their optimizer state only, and re-shard on resume; the export is one PEFT adapter, as one process writes."""
    from safetensors.torch import load_file

    lora = ["--lora-rank", "4", "--learning-rate", "1e-2", "--max-grad-norm", "0"]
    single = finetune(tmp_path, "single", 1, "--grad-accum", "2", *lora)
    sharded = finetune(tmp_path, "fsdp2", 2, "--grad-accum", "1", "--parallel", "fsdp2", *lora,
                       "--stop-after-steps", "3")
    assert sharded == {step: single[step] for step in range(1, 4)}
    resumed = finetune(tmp_path, "fsdp2", 1, "--grad-accum", "2", "--parallel", "fsdp2", *lora, "--resume",
                       launcher=True)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step
    want = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fsdp2" / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 4
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_fp8_extra_state_loads_into_a_model_that_has_not_run_fp8_yet(tmp_path) -> None:
    """TE's extra state is empty until a layer's first FP8 forward; a sharded checkpoint holds it at its saved
    size. Resized to the saved size first, DCP loads it (without that, DCP refuses the size mismatch)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from te_llama.train.parallel import DataOnlyPlanner, DataOnlyReader, sized_like_saved

    saved = {"layer._extra_state": torch.arange(7, dtype=torch.uint8), "layer.weight": torch.randn(3, 4)}
    dcp.save({"model": saved}, checkpoint_id=str(tmp_path))
    fresh = {"layer._extra_state": torch.empty(0, dtype=torch.uint8), "layer.weight": torch.zeros(3, 4)}
    reader = DataOnlyReader(tmp_path)
    with pytest.raises(CheckpointException) as refused:
        dcp.load({"model": dict(fresh)}, storage_reader=DataOnlyReader(tmp_path), planner=DataOnlyPlanner(tmp_path))
    assert "Size mismatch" in str(refused.value.failures)
    sized_like_saved(fresh, reader.read_metadata())
    dcp.load({"model": fresh}, storage_reader=reader, planner=DataOnlyPlanner(tmp_path))
    assert torch.equal(fresh["layer._extra_state"], saved["layer._extra_state"])
    assert torch.equal(fresh["layer.weight"], saved["layer.weight"])
