"""`te-llama bench --quality` end to end on the CPU: the tiny preset, one seed, base and hf rows, LoRA rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from te_llama.bench.quality import BASE, HF, HF_LORA, LORA_BASE, run_quality


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU stand-in and the no-GPU skips")
def test_tiny_quality_bench_end_to_end(tmp_path) -> None:
    pytest.importorskip("peft")
    report = run_quality("tiny", [BASE, HF, "fp8-delayed", LORA_BASE, "lora-fp8", HF_LORA], [0], tmp_path / "out",
                         cache_dir=str(tmp_path / "cache"), progress=lambda _: None)

    rows = [json.loads(line)["text"] for line in (tmp_path / "out/data/pretrain.jsonl").read_text().splitlines()]
    fine = [json.loads(line)["text"] for line in (tmp_path / "out/data/finetune.jsonl").read_text().splitlines()]
    for texts in (rows, fine):  # real installed package sources, not random tokens
        assert sum("def " in r or "import " in r for r in texts) > len(texts) // 2
    assert rows != fine and len(set(rows)) == len(rows)

    assert report["pretrain"]["final_loss"] < report["pretrain"]["first_loss"] - 0.5
    by_name = {r["variant"]: r for r in report["finetune"]}
    assert set(by_name) == {BASE, HF, "fp8-delayed", LORA_BASE, "lora-fp8", HF_LORA}
    for name in (BASE, HF, LORA_BASE, HF_LORA):
        assert by_name[name]["status"] == "ok" and math.isfinite(by_name[name]["eval_loss"])
    assert by_name[BASE]["config"] == {"backend": "reference", "precision": "fp32", "max_grad_norm": 1.0}  # stand-in
    assert by_name[HF]["config"]["max_grad_norm"] == 1.0  # transformers as the Trainer runs it
    assert by_name[BASE]["ratio_base"] == 1.0
    assert by_name["fp8-delayed"]["status"] == "skipped" and by_name["fp8-delayed"]["reason"] == "no CUDA GPU"
    summary = {s["variant"]: s for s in report["summary"]}
    assert summary[BASE]["ratio_base"] == 1.0 and summary[BASE]["qualifies"]
    assert summary["fp8-delayed"]["qualifies"] is None
    # LoRA rows: the same rank, targets, steps and (higher) learning rate, judged against transformers + PEFT
    assert by_name[LORA_BASE]["config"] == {"backend": "reference", "precision": "fp32", "lora_rank": 16,
                                            "max_grad_norm": 1.0}
    assert by_name[HF_LORA]["config"]["lora_rank"] == 16 and by_name["lora-fp8"]["status"] == "skipped"
    assert summary[LORA_BASE]["reference"] == HF_LORA and summary[HF_LORA]["ratio_reference"] == 1.0
    assert summary[LORA_BASE]["qualifies"] is not None and summary[BASE]["reference"] == BASE
    assert by_name[LORA_BASE]["eval_loss"] < report["pretrain"]["first_loss"]
    assert [r["variant"] for r in report["scratch"]] == [BASE, HF, "fp8-delayed"]  # no LoRA from scratch
    assert all(r["status"] == "ok" for r in report["scratch"] if r["variant"] != "fp8-delayed")

    for name in ("quality.json", "quality.md", "quality.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    markdown = (tmp_path / "out/quality.md").read_text()
    assert "fp32 reference" in markdown and "not run: no CUDA GPU" in markdown


def test_scratch_case_alone_over_two_seeds(tmp_path) -> None:
    """The cases split across machines: scratch alone pretrains nothing and summarizes over seeds."""
    report = run_quality("tiny", [BASE], [0, 1], tmp_path / "out", cache_dir=str(tmp_path / "cache"),
                         cases=("scratch",), progress=lambda _: None)

    assert report["pretrain"] is None and report["finetune"] == [] and report["summary"] == []
    assert not (tmp_path / "out/pretrain").exists()
    assert [(r["variant"], r["seed"], r["status"]) for r in report["scratch"]] == [(BASE, 0, "ok"), (BASE, 1, "ok")]
    losses = [r["eval_loss"] for r in report["scratch"]]
    assert losses[0] != losses[1]  # the seed changes init and data order
    (summary,) = report["scratch_summary"]
    assert summary["spread"] == pytest.approx(abs(losses[0] - losses[1]))
    assert json.loads((tmp_path / "out/quality.json").read_text())["scratch"] == report["scratch"]
    with pytest.raises(ValueError, match="choose one or more"):
        run_quality("tiny", [BASE], [0], tmp_path / "other", cases=("pretrain",))
