"""`--batch-size auto`: the split of the step's batch, the probe, and runs planned by it (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from te_llama.cli import build_parser
from te_llama.model.builtin import builtin_model, builtin_tokenizer
from te_llama.model.convert import convert
from te_llama.train import batch_plan
from te_llama.train.batch_plan import AUTO_BATCH_SIZE, largest_fitting, probe_peak
from te_llama.train.config import ConfigError, FinetuneConfig, resolve_config
from te_llama.train.metrics import read_metrics
from te_llama.train.recipe import finetune
from te_llama.train.step import Runtime


def test_the_largest_fitting_size_is_found_without_probing_one_predicted_not_to_fit() -> None:
    """Peaks shaped like the 8B probes': a part that does not grow (30) and one that does (16 + 7.7 per
    example), so 1 and 2 flatter the slope; 4 is probed, 8 is predicted from 2 and 4 and never probed."""
    probed = []

    def probe(size: int) -> float:
        probed.append(size)
        return max(30.0, 16.0 + 7.7 * size)

    assert largest_fitting([1, 2, 4, 8], probe, limit=69.5) == 4
    assert probed == [1, 2, 4]
    assert largest_fitting([1, 2, 4, 8], probe, limit=80.0) == 8
    assert largest_fitting([1, 2, 4, 8], lambda size: None if size > 1 else 1.0, limit=80.0) == 1
    assert largest_fitting([1, 2, 4, 8], probe, limit=29.0) == 0
    assert largest_fitting([8], probe, limit=80.0) == 8


def test_batch_size_is_auto_by_default_a_number_or_refused_with_the_choices() -> None:
    assert FinetuneConfig().batch_size == "auto"
    assert FinetuneConfig(batch_size="4").batch_size == 4
    with pytest.raises(ConfigError, match=r"--batch-size \(batch_size\) 'big' is not a number \(or auto\)"):
        FinetuneConfig(batch_size="big")
    with pytest.raises(ConfigError, match="out of range"):
        FinetuneConfig(batch_size=0)
    parser = build_parser()
    for flag, want in (("auto", "auto"), ("6", 6)):
        args = parser.parse_args(["finetune", "--batch-size", flag])
        assert resolve_config(batch_size=args.batch_size).batch_size == want


def tiny_reference_model(seed: int = 0):
    return convert(builtin_model(builtin_tokenizer(), dtype=torch.float32, seed=seed), backend="reference")


@pytest.mark.parametrize("packing, fused_loss", [(True, True), (True, False), (False, False)],
                         ids=["packed-fused-loss", "packed-hf-loss", "padded"])
def test_the_probe_leaves_weights_gradients_and_random_state_as_they_were(packing, fused_loss) -> None:
    model = tiny_reference_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    config = FinetuneConfig(max_seq_len=32, packing=packing)
    runtime = Runtime(torch.device("cpu"), "reference", "fp32", torch.float32)
    assert probe_peak(model, config, runtime, 4, fused_loss, with_cu_seqlens=packing, pad_token_id=0) == 0
    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name


def losses(output_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_auto_splits_what_does_not_fit_trains_as_that_split_and_resumes_with_it(tmp_path, monkeypatch, caplog) -> None:
    """Probes that find room for 2 examples: 4 micro-batches of 2, the same steps as asking for that split,
    recorded, and reused on resume (where nothing is probed again)."""
    settings = {"cache_dir": str(tmp_path / "cache"), "tensorboard": False, "max_steps": 4, "max_seq_len": 64,
                "eval_every": 100, "save_every": 2}
    monkeypatch.setattr(batch_plan, "can_probe", lambda config, runtime: True)
    monkeypatch.setattr(batch_plan, "fitting_micro_batch", lambda *args: 2)
    caplog.set_level("INFO", logger="te_llama.train.batch_plan")
    auto = tmp_path / "auto"
    finetune(resolve_config(output_dir=str(auto), stop_after_steps=2, **settings))
    assert "batch size auto: 8 examples per step in 4 micro-batches of 2 (128 tokens each" in caplog.text
    saved = json.loads((auto / "run_config.json").read_text())
    assert saved["batch_size"] == "auto" and saved["grad_accum"] == 1 and saved["resolved"]["batch_size"] == "2"

    def must_not_probe(*args):
        raise AssertionError("a resumed run probed again")

    monkeypatch.setattr(batch_plan, "fitting_micro_batch", must_not_probe)
    finetune(resolve_config(output_dir=str(auto), resume=True, **settings))
    explicit = finetune(resolve_config(output_dir=str(tmp_path / "explicit"), batch_size=2, grad_accum=4, **settings))
    assert len(losses(auto)) == 4
    assert losses(auto) == losses(explicit.output_dir)


def test_without_a_gpu_auto_is_the_whole_batch_in_one_micro_batch(tmp_path) -> None:
    result = finetune(resolve_config(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                                     tensorboard=False, max_steps=1, max_seq_len=64, eval_fraction=0))
    saved = json.loads((result.output_dir / "run_config.json").read_text())
    assert saved["resolved"]["batch_size"] == str(AUTO_BATCH_SIZE)
    assert read_metrics(result.output_dir / "metrics.jsonl")[0]["padded_tokens"] <= AUTO_BATCH_SIZE * 64


def test_when_not_even_one_example_fits_the_run_stops_before_writing_anything(tmp_path, monkeypatch) -> None:
    from te_llama.train.faults import OutOfMemory

    monkeypatch.setattr(batch_plan, "can_probe", lambda config, runtime: True)
    monkeypatch.setattr(batch_plan, "fitting_micro_batch", lambda *args: 0)
    out = tmp_path / "run"
    with pytest.raises(OutOfMemory, match=r"while planning --batch-size auto \(not even one example per micro-batch fits\).* with 64 "
                                          r"tokens per micro-batch\. Lower the memory it needs: "
                                          r"--activation-checkpointing \(.*\); --max-seq-len 32 \(now 64\)"):
        finetune(resolve_config(output_dir=str(out), cache_dir=str(tmp_path / "cache"), tensorboard=False,
                                max_steps=1, max_seq_len=64))
    assert not out.exists()


def test_a_run_started_with_a_number_resumes_with_it_when_batch_size_is_left_at_auto(tmp_path) -> None:
    """Runs of earlier versions recorded batch_size 8 (then the default); resuming without the flag continues
    them as they started instead of refusing the changed setting."""
    settings = {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "tensorboard": False,
                "max_steps": 4, "max_seq_len": 64, "eval_every": 100, "save_every": 2}
    finetune(resolve_config(batch_size=4, stop_after_steps=2, **settings))
    finetune(resolve_config(resume=True, **settings))
    whole = finetune(resolve_config(**(settings | {"output_dir": str(tmp_path / "whole")}), batch_size=4))
    assert losses(tmp_path / "run") == losses(whole.output_dir)


def _agree(rank: int, store_path: str, results) -> None:
    import torch.distributed as dist

    from te_llama.train.batch_plan import _fullest_gpu

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    cpu = torch.device("cpu")
    results[rank] = (_fullest_gpu([3.0, None][rank], cpu, dist.ReduceOp.MAX),
                     _fullest_gpu([5.0, 7.0][rank], cpu, dist.ReduceOp.MAX),
                     _fullest_gpu([5.0, 7.0][rank], cpu, dist.ReduceOp.MIN))
    dist.destroy_process_group()


def test_processes_agree_on_every_probe_an_out_of_memory_one_counting_as_the_largest(tmp_path) -> None:
    """Each process decides from the same numbers, so all probe the same sizes (FP8 delayed scaling reduces
    amaxes across processes inside every probe)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_agree, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == (None, 7.0, 5.0)
