"""The bench harness on the CPU: variant selection, skipping, result schema, reports."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from transformers import AutoModelForCausalLM

from te_llama.bench import BenchResult, BenchSettings, _run_variant, run_bench
from te_llama.bench.measure import flops_per_token
from te_llama.bench.report import render_table, speedups
from te_llama.bench.variants import VARIANTS, select, unavailable_reason
from te_llama.model.presets import preset_config

TINY = BenchSettings(preset="tiny-llama", batch=2, seq=32, steps=2, warmup=1)


def test_unknown_variant_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['hf-turbo'\]"):
        select(["hf", "hf-turbo"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip reason")
def test_gpu_variants_are_skipped_with_the_reason(tmp_path) -> None:
    report = run_bench(["hf", "reference", "te-default", "hf-torchao-fp8"], TINY, tmp_path, progress=lambda _: None)
    by_name = {r["variant"]: r for r in report["results"]}
    assert by_name["te-default"] == {**by_name["te-default"], "status": "skipped", "reason": "no CUDA GPU"}
    assert by_name["hf-torchao-fp8"]["status"] == "skipped"
    assert by_name["hf"]["status"] == by_name["reference"]["status"] == "ok"


def test_missing_library_is_a_skip_reason(monkeypatch) -> None:
    import te_llama.bench.variants as variants

    real = variants.importlib.util.find_spec
    monkeypatch.setattr(variants.importlib.util, "find_spec", lambda n: None if n == "liger_kernel" else real(n))
    monkeypatch.setattr(variants.torch.cuda, "is_available", lambda: True)
    assert unavailable_reason(VARIANTS["hf-liger"]) == "liger_kernel not installed"


def test_result_schema_reports_and_same_loss_on_same_weights(tmp_path) -> None:
    report = run_bench(["hf", "reference"], TINY, tmp_path, progress=lambda _: None)
    assert set(report) == {"settings", "environment", "results"}
    assert report["environment"]["torch"] == torch.__version__
    for row in report["results"]:
        assert set(row) == {f.name for f in fields(BenchResult)}
        assert row["median_ms"] > 0 and len(row["step_ms"]) == TINY.steps and row["tokens_per_s"] > 0
    hf, ref = report["results"]
    assert ref["final_loss"] == pytest.approx(hf["final_loss"], rel=1e-4)  # same weights, same batches
    stem = "bench-tiny-llama-b2-s32"
    assert json.loads((tmp_path / f"{stem}.json").read_text())["settings"]["seq"] == 32
    assert "| reference |" in (tmp_path / f"{stem}.md").read_text()
    assert (tmp_path / f"{stem}.png").stat().st_size > 0


def test_a_variant_that_fails_is_reported_not_raised() -> None:
    result = _run_variant("hf", TINY, timeout_s=0.01)
    assert result.status == "failed" and "timed out" in result.reason


def test_table_shows_speedups_over_hf_and_skips() -> None:
    ok = {f.name: None for f in fields(BenchResult)} | {"status": "ok", "p10_ms": 1.0, "p90_ms": 2.0,
                                                          "tokens_per_s": 1.0, "tflops": 1.0, "final_loss": 1.0}
    report = {"settings": {"preset": "p", "batch": 1, "seq": 2, "steps": 3, "warmup": 1}, "environment": {},
              "results": [ok | {"variant": "hf", "median_ms": 200.0}, ok | {"variant": "te-fp8", "median_ms": 100.0},
                          {**ok, "variant": "hf-liger", "status": "skipped", "reason": "liger_kernel not installed"}]}
    assert speedups(report["results"]) == {"hf": 1.0, "te-fp8": 2.0}
    table = render_table(report)
    assert "2.00x" in table and "skipped: liger_kernel not installed" in table
    assert render_table(report, markdown=True).count("\n| ") == 4  # header + 3 rows


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-phi3", "tiny-gemma"])
def test_flop_count_matches_the_model_parameters(preset: str) -> None:
    config = preset_config(preset)
    config.tie_word_embeddings = False  # the lm_head GEMM runs either way; untied, it is a parameter to count
    model = AutoModelForCausalLM.from_config(config)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    head_width = config.num_attention_heads * (getattr(config, "head_dim", None) or
                                               config.hidden_size // config.num_attention_heads)
    attention = 6 * config.num_hidden_layers * 256 * head_width
    assert flops_per_token(config, 256) == 6 * matmul + attention
    assert flops_per_token(config, 256, adapter_params=1000) == 4 * matmul + 6 * 1000 + attention  # frozen base


def test_sample_data_batches_are_the_bundled_text_and_train() -> None:
    """--data sample: real text rows (no padding, ids of the built-in tokenizer), a loss curve per step."""
    from te_llama.bench.measure import measure, token_batches
    from te_llama.model.builtin import builtin_tokenizer

    settings = BenchSettings(preset="tiny-llama", batch=2, seq=64, steps=4, warmup=1, data="sample")
    batches = token_batches(settings, 512, torch.device("cpu"))
    assert len(batches) > 10 and all(tuple(b.shape) == (2, 64) for b in batches)
    text = builtin_tokenizer().decode(batches[0][0])
    assert "the" in text.lower() and int(torch.stack(batches).max()) < 512
    result = measure("reference", settings)
    assert len(result.losses) == 5 and result.losses[-1] < result.losses[0]
    assert result.last_pass_loss is None  # 5 steps saw fewer than every batch once
    with pytest.raises(ValueError, match="'random' or 'sample'"):
        token_batches(BenchSettings(data="zeros"), 512, torch.device("cpu"))


def test_fused_loss_option_trains_like_hf_loss() -> None:
    from te_llama.bench.measure import measure

    settings = BenchSettings(preset="tiny-llama", batch=2, seq=32, steps=4, warmup=1)
    want = measure("reference", BenchSettings(**{**settings.__dict__, "options": {"fused_loss": False}}))
    got = measure("reference", settings)  # the fused loss: finetune's default on this backend
    assert len(got.losses) == len(want.losses) == 5
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), atol=1e-4, rtol=0)


def test_more_recomputed_layers_than_the_preset_has_are_refused() -> None:
    from te_llama.bench.measure import measure
    from te_llama.train.config import ConfigError

    settings = BenchSettings(**{**TINY.__dict__, "options": {"activation_checkpointing": True,
                                                              "activation_checkpointing_layers": 9}})
    with pytest.raises(ConfigError, match="the model has 4 decoder layers; use 4 or less"):
        measure("reference", settings)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-phi3", "tiny-gemma"])
def test_family_presets_bench_like_transformers(preset: str) -> None:
    """`te-llama bench --preset` of each new family: the reference row trains the HF row's model."""
    from te_llama.bench.measure import measure

    settings = BenchSettings(preset=preset, batch=2, seq=32, steps=2, warmup=1)
    hf, ours = measure("hf", settings), measure("reference", settings)
    assert hf.status == ours.status == "ok"
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(hf.losses), rtol=1e-4, atol=0)


def test_rows_are_finetune_configurations_with_the_bench_options_passed_through() -> None:
    from te_llama.bench.measure import row_config
    from te_llama.train.config import FinetuneConfig

    settings = BenchSettings(batch=4, seq=128, steps=5, warmup=2, lr=3e-4,
                             options={"precision": "fp8", "max_grad_norm": 1.0})
    default = row_config(VARIANTS["te-default"], BenchSettings(batch=4, seq=128, steps=5, warmup=2))
    assert default == FinetuneConfig(backend="te", batch_size=4, max_seq_len=128, max_steps=7, learning_rate=1e-5,
                                      tensorboard=False)  # finetune's defaults otherwise
    ours, peer = row_config(VARIANTS["te-default"], settings), row_config(VARIANTS["hf"], settings)
    assert (ours.precision, ours.max_grad_norm, ours.learning_rate) == ("fp8", 1.0, 3e-4)
    assert (peer.precision, peer.max_grad_norm, peer.backend, peer.packing) == ("auto", 1.0, "hf", False)
    report = {"settings": {"preset": "p", "batch": 1, "seq": 2, "steps": 3, "warmup": 1, "lr": 1e-4},
              "environment": {}, "results": []}
    assert "lr 0.0001" in render_table(report)


def test_the_bench_times_the_finetune_step(monkeypatch) -> None:
    """Each row's step comes from te_llama.train.step.build_train_step, as in te-llama finetune."""
    import te_llama.bench.measure as measure_module
    from te_llama.train import step as step_module

    built = []

    def recording(config, *args, **kwargs):
        built.append(config)
        return step_module.build_train_step(config, *args, **kwargs)

    monkeypatch.setattr(measure_module, "build_train_step", recording)
    settings = BenchSettings(preset="tiny-llama", batch=2, seq=32, steps=2, warmup=1)
    assert measure_module.measure("reference", settings).status == "ok"
    assert built == [measure_module.row_config(VARIANTS["reference"], settings)]


@pytest.mark.parametrize("flag", ["--grad-accum", "--parallel"])
def test_options_the_bench_cannot_time_are_not_accepted(flag, capsys) -> None:
    from te_llama.cli import main

    with pytest.raises(SystemExit):  # one process, one micro-batch per step: not passed through
        main(["bench", flag, "2"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_the_variant_list_is_short_and_described(capsys) -> None:
    from te_llama.cli import main

    assert main(["bench", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list(VARIANTS) and 5 <= len(names) <= 12
    assert main(["bench", "--list", "-v"]) == 0
    assert all(len(line.split(maxsplit=1)) == 2 for line in capsys.readouterr().out.splitlines())


def test_last_pass_loss_averages_one_step_per_distinct_batch() -> None:
    from te_llama.bench.measure import last_pass_mean

    assert last_pass_mean([9.0, 4.0, 1.0, 2.0, 3.0], 3) == pytest.approx(2.0)
    assert last_pass_mean([9.0, 4.0], 3) is None
    settings = BenchSettings(preset="tiny-llama", batch=2, seq=32, steps=5, warmup=1, distinct_batches=4)
    result = _run_variant("hf", settings, timeout_s=300)
    assert len(result.losses) == 6
    assert result.last_pass_loss == pytest.approx(sum(result.losses[-4:]) / 4)


def test_lora_rows_pass_the_lora_options_to_every_row_and_train_alike() -> None:
    """--lora-rank reaches the peers too (transformers + PEFT, same rank and targets); --lora-base only ours."""
    pytest.importorskip("peft")
    from te_llama.bench.measure import measure, row_config

    settings = BenchSettings(preset="tiny-llama", batch=2, seq=32, steps=2, warmup=1,
                             options={"lora_rank": 4, "lora_targets": ["q_proj", "v_proj"]})
    peer, ours = row_config(VARIANTS["hf-lora"], settings), row_config(VARIANTS["te-lora-fp8"], settings)
    assert (peer.lora_rank, peer.lora_targets, peer.lora_base) == (4, ["q_proj", "v_proj"], "bf16")
    assert (ours.lora_rank, ours.lora_base, ours.backend) == (4, "fp8", "te")
    assert row_config(VARIANTS["hf"], settings).lora_rank == 4  # every row trains LoRA when asked
    hf, reference = measure("hf-lora", settings), measure("reference", settings)
    assert hf.status == reference.status == "ok"
    assert reference.losses[0] == pytest.approx(hf.losses[0], rel=1e-4)  # new adapters change nothing
