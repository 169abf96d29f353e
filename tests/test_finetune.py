"""`te-llama finetune` end to end on the CPU (reference backend, built-in tiny model)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.cli import main as cli_main
from te_llama.model.builtin import (
    SAMPLE_CHAT,
    asset_path,
    builtin_model,
    builtin_tokenizer,
)
from te_llama.train.batching import collate_packed, collate_padded
from te_llama.train.checkpoints import checkpoints
from te_llama.train.config import ConfigError, resolve_config
from te_llama.train.metrics import read_metrics
from te_llama.train.recipe import finetune
from te_llama.train.run_dir import RunDirectoryError

LOSS_RTOL = 1e-5  # packing vs padding: the same math up to summation order
EXPORT_LOGITS_REL = 1e-5  # the export in vanilla HF vs te-llama's reference layers (FP32, relative to the max)


def run(tmp_path, name: str = "run", **overrides):
    settings = {"output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), "tensorboard": False,
                "max_steps": 12, "max_seq_len": 64, "batch_size": 4, "eval_every": 6, "save_every": 4}
    return finetune(resolve_config(**(settings | overrides)))


def train_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_default_job_learns_and_exports_a_vanilla_hf_model(tmp_path) -> None:
    result = run(tmp_path, max_steps=30, max_seq_len=128, batch_size=8)
    losses = train_losses(result.output_dir)
    assert losses[30] < 0.6 * losses[1]
    assert result.eval_loss is not None and result.eval_loss < losses[1]
    assert (result.output_dir / "metrics.png").stat().st_size > 0
    assert json.loads((result.output_dir / "run_config.json").read_text())["max_steps"] == 30

    vanilla = AutoModelForCausalLM.from_pretrained(result.exported)
    trained = te_llama.from_pretrained(result.exported, backend="reference")
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 20))
    with torch.no_grad():
        want, got = vanilla(ids).logits, trained(ids).logits
        assert float((got - want).abs().max() / want.abs().max()) <= EXPORT_LOGITS_REL
    assert (result.exported / "tokenizer.json").is_file()


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-phi3", "tiny-gemma"])
def test_family_checkpoint_finetunes_and_exports_for_vanilla_transformers(preset: str, tmp_path) -> None:
    """A tiny random checkpoint of each new family through `te-llama finetune` (reference backend)."""
    from te_llama.model.presets import preset_config

    tokenizer, folder = builtin_tokenizer(), tmp_path / "checkpoint"
    config = preset_config(preset)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run(tmp_path, model=str(folder), max_steps=6, eval_fraction=0.0, save_every=0, learning_rate=1e-3)
    losses = train_losses(result.output_dir)
    assert losses[6] < losses[1]

    vanilla = AutoModelForCausalLM.from_pretrained(result.exported)
    assert vanilla.config.model_type == config.model_type
    trained = te_llama.from_pretrained(result.exported, backend="reference")
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vanilla(ids).logits, trained(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= EXPORT_LOGITS_REL
    original = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert vanilla.state_dict().keys() == original.keys()  # Phi-3's fused qkv_proj / gate_up_proj included
    assert not all(torch.equal(vanilla.state_dict()[k], v) for k, v in original.items())  # it trained


def _examples(tokenizer, texts):
    return [{"input_ids": ids, "labels": list(ids)} for ids in (tokenizer(t)["input_ids"] for t in texts)]


def _packable_model(backend: str, tokenizer):
    """te-llama's reference layers, or transformers as backend 'hf' trains it: its config keeps use_cache on."""
    model = builtin_model(tokenizer)
    model.config.use_cache = True
    return model if backend == "hf" else te_llama.convert(model, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "hf"])
def test_packing_gives_the_padded_loss_on_the_same_examples(backend: str) -> None:
    tokenizer = builtin_tokenizer()
    model = _packable_model(backend, tokenizer)
    examples = _examples(tokenizer, ["The sum of 3 and 4 is 7.", "After one comes two.",
                                     "The colour of the sky is blue. Everyone knows it."])
    packed, padded = collate_packed(examples), collate_padded(examples, tokenizer.pad_token_id)
    assert packed.real_tokens == padded.real_tokens < padded.padded_tokens
    with torch.no_grad():
        loss_packed = model(**packed.inputs).loss
        loss_padded = model(**padded.inputs).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("backend", ["reference", "hf"])
def test_packed_examples_do_not_attend_to_each_other(backend: str) -> None:
    tokenizer = builtin_tokenizer()
    model = _packable_model(backend, tokenizer)
    first, second = _examples(tokenizer, ["The sum of 3 and 4 is 7.", "After one comes two."])
    changed = {"input_ids": [t + 1 for t in first["input_ids"]], "labels": first["labels"]}
    n = len(first["input_ids"])
    with torch.no_grad():
        a = model(**{k: v for k, v in collate_packed([first, second]).inputs.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in collate_packed([changed, second]).inputs.items() if k != "labels"}).logits
    assert not torch.equal(a[:, :n], b[:, :n])
    torch.testing.assert_close(a[:, n:], b[:, n:], rtol=0, atol=1e-6)


def test_chat_loss_covers_exactly_the_assistant_tokens(tmp_path) -> None:
    from te_llama.train.data import IGNORE_INDEX, load_examples

    tokenizer = builtin_tokenizer()
    examples, _ = load_examples(str(asset_path(SAMPLE_CHAT)), tokenizer, 512, None)
    row = json.loads(asset_path(SAMPLE_CHAT).read_text().splitlines()[0])
    first = examples[0]
    trained = tokenizer.decode([t for t in first["labels"] if t != IGNORE_INDEX])
    expected = "".join(m["content"] + "<|end|>" for m in row["messages"] if m["role"] == "assistant")
    assert trained == expected
    masked = [i for i, t in zip(first["input_ids"], first["labels"]) if t == IGNORE_INDEX]
    assert "What is" in tokenizer.decode(masked) and "careful calculator" in tokenizer.decode(masked)


def test_chat_finetune_runs(tmp_path) -> None:
    result = run(tmp_path, data=str(asset_path(SAMPLE_CHAT)), max_steps=4, max_seq_len=128)
    assert result.steps == 4


def test_resume_continues_exactly(tmp_path) -> None:
    whole = run(tmp_path, "whole")
    run(tmp_path, "split", stop_after_steps=6)
    assert [p.name for p in checkpoints(tmp_path / "split" / "checkpoints")] == ["step-00000004", "step-00000006"]
    saved = tmp_path / "split" / "run_config.json"  # a run started before a setting existed
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "data_split"}))
    resumed = run(tmp_path, "split", resume=True)
    assert resumed.steps == 12
    want, got = train_losses(whole.output_dir), train_losses(resumed.output_dir)
    assert sorted(got) == list(range(1, 13))
    for step in range(7, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import te_llama.train.checkpoints as ts
    from te_llama.train.recipe import finetune
    from te_llama.train.config import ConfigError, resolve_config
    real_save, calls = ts.torch.save, []
    def save_then_die(obj, path):
        calls.append(path)
        if len(calls) == 2:              # second checkpoint: write half a file, then get killed
            open(path, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)
    ts.torch.save = save_then_die
    finetune(resolve_config(output_dir=sys.argv[1], cache_dir=sys.argv[2], tensorboard=False, max_steps=12,
                            max_seq_len=64, batch_size=4, eval_every=6, save_every=4))
""")


def test_kill_during_checkpoint_save_keeps_the_last_good_one(tmp_path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(out), str(tmp_path / "cache")],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000004"]
    assert list((out / "checkpoints").glob(".step-*.tmp-*"))  # the half-written one, never renamed
    whole = run(tmp_path, "whole")
    resumed = run(tmp_path, "killed", resume=True)
    assert not list((out / "checkpoints").glob(".step-*.tmp-*"))
    want, got = train_losses(whole.output_dir), train_losses(resumed.output_dir)
    for step in range(5, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_missing_data_file(tmp_path, monkeypatch) -> None:
    with pytest.raises(te_llama.TeLlamaError, match="no such file"):
        run(tmp_path, data=str(tmp_path / "nope.jsonl"))
    assert not (tmp_path / "run").exists()  # a failed start leaves no run behind to block a retry
    monkeypatch.chdir(tmp_path)  # "dir/file.jsonl" is a missing file, not a hub dataset name
    with pytest.raises(te_llama.TeLlamaError, match="data/train.jsonl: no such file"):
        run(tmp_path, data="data/train.jsonl")


def test_empty_dataset(tmp_path) -> None:
    with pytest.raises(te_llama.TeLlamaError, match="empty"):
        run(tmp_path, data=_write(tmp_path / "empty.jsonl", []))


def test_rows_without_the_text_field(tmp_path) -> None:
    data = _write(tmp_path / "d.jsonl", ['{"body": "hello there"}'] * 5)
    with pytest.raises(te_llama.TeLlamaError, match="no 'text' column.*--text-field"):
        run(tmp_path, data=data)
    assert run(tmp_path, "ok", data=data, text_field="body", max_steps=2).steps == 2


def test_malformed_json_lines_fail_by_default_and_are_counted_when_skipped(tmp_path) -> None:
    good = json.dumps({"text": "The sum of 1 and 2 is 3."})
    data = _write(tmp_path / "d.jsonl", [good, "{not json", good, '["a list"]', good])
    with pytest.raises(te_llama.TeLlamaError, match=r"2 malformed JSON line\(s\) \(line 2, 4\).*--on-bad-rows skip"):
        run(tmp_path, data=data)
    result = run(tmp_path, "skip", data=data, on_bad_rows="skip", max_steps=2, eval_fraction=0)
    assert json.loads((result.output_dir / "data_report.json").read_text())["malformed_skipped"] == 2


def test_sequences_longer_than_the_limit(tmp_path) -> None:
    data = _write(tmp_path / "d.jsonl", [json.dumps({"text": "one two three " * 40})] * 4)
    with pytest.raises(te_llama.TeLlamaError, match="longer than --max-seq-len 64"):
        run(tmp_path, data=data, long_rows="fail")
    result = run(tmp_path, "cut", data=data, max_steps=2, eval_fraction=0)
    assert json.loads((result.output_dir / "data_report.json").read_text())["truncated"] == 4


def test_tokenizer_without_pad_token(tmp_path, monkeypatch) -> None:
    import te_llama.train.setup as setup

    def no_pad():
        tokenizer = builtin_tokenizer()
        tokenizer.pad_token = None
        return tokenizer

    monkeypatch.setattr(setup, "builtin_tokenizer", no_pad)
    assert run(tmp_path, packing=False, max_steps=2).steps == 2  # falls back to eos as pad

    def nothing():
        tokenizer = no_pad()
        tokenizer.eos_token = None
        return tokenizer

    monkeypatch.setattr(setup, "builtin_tokenizer", nothing)
    with pytest.raises(te_llama.TeLlamaError, match="neither a pad nor an eos token"):
        run(tmp_path, "x", packing=False, max_steps=2)


def test_output_dir_with_a_different_run(tmp_path) -> None:
    run(tmp_path, max_steps=2)
    with pytest.raises(RunDirectoryError, match="already holds a previous te-llama run.*--resume"):
        run(tmp_path, max_steps=3)
    with pytest.raises(RunDirectoryError, match=r"other settings \(learning_rate"):
        run(tmp_path, max_steps=2, learning_rate=1.0, resume=True)
    assert run(tmp_path, max_steps=3, overwrite=True).steps == 3


def test_flags_override_the_config_file(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("max_steps: 9\nbatch_size: 2\nlearning_rate: 0.01\n")
    config = resolve_config(tmp_path / "c.yaml", batch_size=3, model=None)
    assert (config.max_steps, config.batch_size, config.learning_rate) == (9, 3, 0.01)
    (tmp_path / "c.toml").write_text("[finetune]\nmax_steps = 5\n")
    assert resolve_config(tmp_path / "c.toml").max_steps == 5
    (tmp_path / "bad.yaml").write_text("max_stepz: 9\n")
    with pytest.raises(ValueError, match="unknown option.*max_stepz"):
        resolve_config(tmp_path / "bad.yaml")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys) -> None:
    code = cli_main(["finetune", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o"),
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_hf_baseline_backend_runs_and_exports(tmp_path) -> None:
    result = run(tmp_path, backend="hf", packing=False, max_steps=3, save_every=0)
    assert result.steps == 3 and not (result.output_dir / "checkpoints").exists()
    assert AutoModelForCausalLM.from_pretrained(result.exported) is not None


def test_hf_backend_with_packing_says_it_attends_through_a_full_mask(tmp_path, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="te_llama")
    run(tmp_path, "packed", backend="hf", max_steps=1, save_every=0)
    assert "backend hf with packing: transformers keeps the packed examples apart with a full" in caplog.text
    caplog.clear()
    run(tmp_path, "padded", backend="hf", packing=False, max_steps=1, save_every=0)
    assert "backend hf with packing" not in caplog.text


@pytest.mark.parametrize("layers", [None, 1, 3])
def test_activation_checkpointing_recomputes_layers(monkeypatch, layers) -> None:
    from te_llama.model.layers.reference import ReferenceTransformerLayer
    from te_llama.train.config import FinetuneConfig
    from te_llama.train.setup import load_model_and_tokenizer
    from te_llama.train.step import Runtime

    runtime = Runtime(torch.device("cpu"), "reference", "fp32", torch.float32)
    model, _ = load_model_and_tokenizer(FinetuneConfig(activation_checkpointing=True,
                                                       activation_checkpointing_layers=layers), runtime)
    calls = []
    real_forward = ReferenceTransformerLayer.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(ReferenceTransformerLayer, "forward", counting_forward)
    ids = torch.randint(0, 500, (1, 20))
    model(ids, labels=ids).loss.backward()
    recomputed = len(model.model.layers) if layers is None else layers
    assert len(calls) == len(model.model.layers) + recomputed  # forward, then the recompute in backward
    assert [layer.gradient_checkpointing for layer in model.model.layers][:recomputed] == [True] * recomputed


@pytest.mark.parametrize("layers", [None, 2])
def test_activation_checkpointing_gives_the_same_losses(tmp_path, caplog, layers) -> None:
    """With the overlapped AdamW (the default without clipping) too: recomputes add no second update."""
    import logging

    caplog.set_level(logging.INFO, logger="te_llama")
    plain = run(tmp_path, "plain", max_steps=3, save_every=0)
    recomputed = run(tmp_path, "recomputed", max_steps=3, save_every=0, activation_checkpointing=True,
                     activation_checkpointing_layers=layers)
    assert "overlap optimizer off" not in caplog.text
    want, got = train_losses(plain.output_dir), train_losses(recomputed.output_dir)
    assert got == pytest.approx(want, rel=1e-5)


def test_overlapped_optimizer_trains_and_resumes_like_adamw(tmp_path, caplog) -> None:
    """Without clipping LayerwiseAdamW is on by default; same losses as --no-overlap-optimizer, resume exact."""
    import logging

    caplog.set_level(logging.INFO, logger="te_llama")
    overlapped = run(tmp_path, "overlap", max_grad_norm=0.0)
    assert "each layer updated during backward" in caplog.text and "overlap optimizer off" not in caplog.text
    plain = run(tmp_path, "plain", max_grad_norm=0.0, overlap_optimizer=False)
    want, got = train_losses(plain.output_dir), train_losses(overlapped.output_dir)
    assert got == want
    run(tmp_path, "split", max_grad_norm=0.0, stop_after_steps=6)
    resumed = train_losses(run(tmp_path, "split", max_grad_norm=0.0, resume=True).output_dir)
    assert [resumed[step] for step in range(7, 13)] == [want[step] for step in range(7, 13)]


def test_auto_features_are_on_only_where_exact() -> None:
    from te_llama.train.step import Runtime, resolve_features

    cpu = Runtime(torch.device("cpu"), "reference", "fp32", torch.float32)
    features = resolve_features(resolve_config(), cpu, None, 1)  # the defaults: no clipping
    assert (features.cuda_graphs, features.overlap_optimizer, features.fused_loss) == (False, True, True)
    assert features.optimizer_kernel == "torch"  # Triton's needs CUDA
    assert not resolve_features(resolve_config(max_grad_norm=1.0), cpu, None, 1).overlap_optimizer
    assert not resolve_features(resolve_config(max_grad_norm=0.0, grad_accum=2), cpu, None, 1).overlap_optimizer
    assert resolve_features(resolve_config(max_grad_norm=0.0, activation_checkpointing=True), cpu, None,
                            1).overlap_optimizer
    several = resolve_features(resolve_config(max_grad_norm=0.0), cpu, None, 2)  # the fused loss runs in LossModel
    assert not several.overlap_optimizer and several.fused_loss
    gpu = Runtime(torch.device("cuda"), "te", "bf16", torch.bfloat16)
    assert resolve_features(resolve_config(), gpu, None, 1).cuda_graphs
    assert resolve_features(resolve_config(), gpu, None, 2).cuda_graphs  # DDP: graphs hand their grads to its hooks
    assert not resolve_features(resolve_config(parallel="fsdp2"), gpu, None, 2).cuda_graphs
    with pytest.raises(ConfigError, match="--cuda-graphs cannot run here: FSDP2 all-gathers each layer's weights"):
        resolve_features(resolve_config(parallel="fsdp2", cuda_graphs=True), gpu, None, 2)
    with pytest.raises(ConfigError, match="--overlap-optimizer cannot run here: DDP and FSDP2 reduce gradients"):
        resolve_features(resolve_config(overlap_optimizer=True), gpu, None, 2)
    baseline = Runtime(torch.device("cuda"), "hf", "bf16", torch.bfloat16)  # transformers as is, on any device
    features = resolve_features(resolve_config(max_grad_norm=0.0), baseline, None, 1)
    assert (features.fused_loss, features.overlap_optimizer, features.optimizer_kernel) == (False, False, "torch")


@pytest.mark.parametrize(("option", "backend", "message"), [
    ("overlap_optimizer", "reference", "--overlap-optimizer cannot run here: clipping by the global norm needs every "
                                       "gradient before any update: use --max-grad-norm 0"),
    ("cuda_graphs", "reference", "--cuda-graphs cannot run here: backend 'reference' (graphs are for TE layers)"),
    ("fused_loss", "hf", "--fused-loss cannot run here: backend 'hf' is the baseline"),
])
def test_explicit_features_that_cannot_run_are_refused_at_start(tmp_path, option, backend, message) -> None:
    clipped = {"max_grad_norm": 1.0} if option == "overlap_optimizer" else {}
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(tmp_path, backend=backend, packing=backend != "hf", **{option: True}, **clipped)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fused_loss_trains_like_transformers_loss(tmp_path) -> None:
    """The default step computes the loss with te_llama.train.loss; --no-fused-loss gives HF's, same losses."""
    fused = run(tmp_path, "fused", max_steps=4, save_every=0)
    plain = run(tmp_path, "plain", max_steps=4, save_every=0, fused_loss=False)
    want, got = train_losses(plain.output_dir), train_losses(fused.output_dir)
    assert got == pytest.approx(want, rel=1e-5)
