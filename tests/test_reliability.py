"""A user's files and work are never lost; bad values are refused before any work (CPU, built-in model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import te_llama
from te_llama.cli import main as cli_main
from te_llama.train.checkpoints import checkpoints
from te_llama.train.config import ConfigError, resolve_config
from te_llama.train.metrics import read_metrics
from te_llama.train.recipe import finetune
from te_llama.train.run_dir import RunDirectoryError

SHORT = {"tensorboard": False, "max_steps": 4, "max_seq_len": 64, "batch_size": 4, "eval_every": 2,
         "save_every": 2}


def run(tmp_path, name: str = "run", **overrides):
    settings = {"output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache")} | SHORT
    return finetune(resolve_config(**(settings | overrides)))


def cli(tmp_path, *args: str, name: str = "run") -> int:
    return cli_main(["finetune", "--output-dir", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"),
                     "--no-tensorboard", *args])


def train_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


# ---- bad values: refused when parsed, nothing created


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-steps", "-3", "--max-steps (max_steps) -3 is out of range: it must be at least 1"),
    ("--max-steps", "0", "--max-steps (max_steps) 0 is out of range"),
    ("--batch-size", "0", "--batch-size (batch_size) 0 is out of range: it must be at least 1"),
    ("--grad-accum", "0", "--grad-accum (grad_accum) 0 is out of range"),
    ("--warmup-ratio", "2", "--warmup-ratio (warmup_ratio) 2.0 is out of range: it is a share of the steps, from 0 to 1"),
    ("--eval-fraction", "1.5", "--eval-fraction (eval_fraction) 1.5 is out of range"),
    ("--max-seq-len", "0", "--max-seq-len (max_seq_len) 0 is out of range"),
    ("--learning-rate", "0", "--learning-rate (learning_rate) 0.0 is out of range: it must be above 0"),
    ("--keep-last", "0", "--keep-last (keep_last) 0 is out of range"),
    ("--max-memory", "0.5", "--max-memory (max_memory) 0.5 is out of range: it is the GiB this run may use"),
    ("--activation-checkpointing-layers", "0", "--activation-checkpointing-layers (activation_checkpointing_layers) 0 "
                                               "is out of range: it is how many decoder layers to recompute"),
    ("--activation-checkpointing-layers", "2", "--activation-checkpointing-layers (activation_checkpointing_layers) "
                                               "says how many layers activation checkpointing recomputes: add "
                                               "--activation-checkpointing"),
])
def test_out_of_range_flags_are_refused_before_any_work(tmp_path, capsys, flag, value, message) -> None:
    assert cli(tmp_path, flag, value) == 2
    err = capsys.readouterr().err
    assert f"te-llama: error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("flag", "value"), [("--long-rows", "chop"), ("--on-bad-rows", "ignore"),
                                             ("--precision", "fp4"), ("--parallel", "zero3")])
def test_unknown_choices_are_refused_by_the_parser(tmp_path, capsys, flag, value) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, flag, value)
    assert exit_info.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_values_are_coerced_to_their_type_or_refused(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-5\nmax_steps: '7'\nwarmup_ratio: 0\n")
    config = resolve_config(tmp_path / "c.yaml")  # PyYAML reads 1e-5 as the string '1e-5'
    assert (config.learning_rate, config.max_steps, config.warmup_ratio) == (1e-5, 7, 0.0)
    assert type(config.learning_rate) is float and type(config.max_steps) is int
    for text, message in [("long_rows: chop\n", "--long-rows (long_rows) 'chop' is not one of: truncate, drop, fail"),
                          ("on_bad_rows: ignore\n", "'ignore' is not one of: fail, skip"),
                          ("learning_rate: fast\n", "--learning-rate (learning_rate) 'fast' is not a number"),
                          ("max_steps: 2.5\n", "--max-steps (max_steps) 2.5 must be a whole number"),
                          ("packing: 'no'\n", "--packing (packing) 'no' must be true or false"),
                          ("batch_size: 0\n", "--batch-size (batch_size) 0 is out of range")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError) as error:
            resolve_config(tmp_path / "bad.yaml")
        assert message in str(error.value)


def test_sequence_length_past_the_models_positions_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"--max-seq-len 4096 is above the model's max_position_embeddings 1024"):
        run(tmp_path, max_seq_len=4096)
    assert not (tmp_path / "run").exists()


def test_more_recomputed_layers_than_the_model_has_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"--activation-checkpointing-layers 9: the model has 4 decoder layers; use 4 "
                                          r"or less"):
        run(tmp_path, activation_checkpointing=True, activation_checkpointing_layers=9)
    assert not (tmp_path / "run").exists()


def test_precision_literals_match_the_precisions_te_llama_implements() -> None:
    from typing import get_args

    from te_llama.precision import PRECISIONS
    from te_llama.train.config import Precision

    assert get_args(Precision) == ("auto", *PRECISIONS)


# ---- the output folder: only te-llama's own files are ever deleted


def test_overwrite_never_deletes_files_te_llama_did_not_write(tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "x"
    work.mkdir()
    (work / "thesis.tex").write_text("keep")
    monkeypatch.chdir(work)
    code = cli_main(["finetune", "--max-steps", "2", "--output-dir", ".", "--overwrite", "--cache-dir",
                     str(tmp_path / "cache"), "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and "holds files te-llama did not write (thesis.tex)" in err and "--overwrite" not in err
    assert (work / "thesis.tex").read_text() == "keep" and sorted(os.listdir(work)) == ["thesis.tex"]


def test_overwrite_replaces_only_te_llamas_entries_of_a_previous_run(tmp_path) -> None:
    first = run(tmp_path, max_steps=2)
    (first.output_dir / "checkpoints" / "notes.txt").write_text("mine")  # a user's file inside the run
    with pytest.raises(RunDirectoryError, match=r"did not write \(checkpoints/notes.txt\)"):
        run(tmp_path, max_steps=3, overwrite=True)
    (first.output_dir / "checkpoints" / "notes.txt").unlink()
    inode = first.output_dir.stat().st_ino
    assert run(tmp_path, max_steps=3, overwrite=True).steps == 3
    assert first.output_dir.stat().st_ino == inode  # the folder itself was kept
    assert json.loads((first.output_dir / "run_config.json").read_text())["max_steps"] == 3


def test_a_new_run_never_deletes_the_model_or_data_it_reads(tmp_path) -> None:
    previous = run(tmp_path, max_steps=2)  # its export: tmp_path/run/final
    with pytest.raises(RunDirectoryError, match=r"--model .*final is inside .*final, which starting a new run"):
        run(tmp_path, model=str(previous.exported), max_steps=2, overwrite=True)
    assert (previous.exported / "config.json").is_file()
    assert run(tmp_path, "next", model=str(previous.exported), max_steps=2).steps == 2  # elsewhere: fine


def test_overwrite_refuses_the_home_folder_and_parents_of_the_working_directory(tmp_path, monkeypatch) -> None:
    previous = run(tmp_path, max_steps=2)  # a finished run in tmp_path/run
    inside = previous.output_dir / "final"
    monkeypatch.chdir(inside)
    with pytest.raises(RunDirectoryError, match="does not clear this folder \\(it holds the current folder\\)"):
        run(tmp_path, max_steps=3, overwrite=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(previous.output_dir))
    with pytest.raises(RunDirectoryError, match="it is your home folder"):
        run(tmp_path, max_steps=3, overwrite=True)
    assert (inside / "config.json").is_file()


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_rerun(tmp_path, monkeypatch, capsys) -> None:
    import te_llama.train.loss as loss

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(loss, "causal_lm_loss", out_of_memory)
    assert cli(tmp_path, "--max-steps", "4", "--max-seq-len", "64", "--batch-size", "4") == 2
    err = capsys.readouterr().err
    assert "te-llama: error: out of GPU memory at step 1 with 256 tokens per micro-batch" in err
    assert "--batch-size 2 (now 4; add --grad-accum 2 to keep the batch)" in err
    assert "--activation-checkpointing" in err and "Traceback" not in err
    assert (tmp_path / "run" / "run_config.json").is_file() and not checkpoints(tmp_path / "run" / "checkpoints")
    monkeypatch.undo()
    with pytest.raises(RunDirectoryError, match="stopped before its first checkpoint, so there is nothing to resume; "
                                                "start it again without --resume"):
        run(tmp_path, resume=True)
    assert run(tmp_path).steps == 4  # the same command again just works


def test_out_of_memory_fixes_follow_the_activation_checkpointing_in_use() -> None:
    from te_llama.train.config import FinetuneConfig
    from te_llama.train.step import Runtime, memory_fixes

    runtime = Runtime(torch.device("cpu"), "reference", "fp32", torch.float32)
    plain = memory_fixes(FinetuneConfig(batch_size=8), runtime, graphed=False)
    assert any(f.startswith("--activation-checkpointing (") for f in plain)
    some = memory_fixes(FinetuneConfig(activation_checkpointing=True, activation_checkpointing_layers=3, batch_size=8), runtime,
                        graphed=False)
    assert "more recomputed layers: raise --activation-checkpointing-layers (now 3), or leave it out to recompute " \
           "every layer" in some
    every = memory_fixes(FinetuneConfig(activation_checkpointing=True, batch_size=8), runtime, graphed=False)
    assert not any("activation-checkpointing" in f for f in every)
    all_of_them = memory_fixes(FinetuneConfig(activation_checkpointing=True, activation_checkpointing_layers=4, batch_size=8),
                               runtime, graphed=False, layers=4)
    assert not any("activation-checkpointing" in f for f in all_of_them)


KILL_AT_STEP = """
import os, signal, sys
import te_llama.train.loss as loss
from te_llama.train.recipe import finetune
from te_llama.train.config import resolve_config
real_loss, calls = loss.causal_lm_loss, []
def loss_then_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_loss(*args, **kwargs)
loss.causal_lm_loss = loss_then_die
finetune(resolve_config(output_dir=sys.argv[1], cache_dir=sys.argv[2], tensorboard=False, max_steps=4,
                        max_seq_len=64, batch_size=4, save_every=2))
"""


def test_kill_before_the_first_checkpoint_does_not_block_the_rerun(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(tmp_path / "run"), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "run" / "run_config.json").is_file()
    assert run(tmp_path).steps == 4


# ---- resume refuses other data


def test_resume_refuses_data_changed_in_place(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Row {i}: the sum of {i} and 1 is {i + 1}."}) + "\n"
                            for i in range(40)))
    run(tmp_path, data=str(data), stop_after_steps=2)
    stat = data.stat()
    data.write_text(data.read_text().replace("Row 3:", "Row 9:"))  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    with pytest.raises(RunDirectoryError, match="--resume: the data changed since the run"):
        run(tmp_path, data=str(data), resume=True)


def test_resume_refuses_another_resolved_precision(tmp_path) -> None:
    """"auto" resolves per machine and version: a run that trained in BF16 is not resumed in FP8
    (or here, fp32) because "auto" now means something else; the message gives the flag to pass."""
    run(tmp_path, stop_after_steps=2)
    saved = tmp_path / "run" / "run_config.json"
    config = json.loads(saved.read_text())
    assert config["precision"] == "auto" and config["resolved"] == {
        "backend": "reference", "precision": "fp32", "param_dtype": "float32"}
    saved.write_text(json.dumps(config | {"resolved": config["resolved"] | {"precision": "bf16"}}))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(RunDirectoryError, match="trained with precision bf16 \\(now fp32\\); resume it the same "
                                                "way: --precision bf16"):
        run(tmp_path, resume=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert run(tmp_path, resume=True, precision="bf16", max_steps=4).steps == 4  # as told: it resumes


def test_resume_of_a_run_that_predates_the_resolved_record(tmp_path) -> None:
    """Without the record, "auto" is read as it meant then (BF16 on CUDA, FP32 on CPU), an explicit
    value as written; a setting this te-llama no longer has is refused when the run used it."""
    run(tmp_path, stop_after_steps=2, seed=3)
    saved = tmp_path / "run" / "run_config.json"
    config = json.loads(saved.read_text())
    legacy = {k: v for k, v in config.items() if k not in ("resolved", "eval_split_seed")}
    saved.write_text(json.dumps(legacy | {"bf16_first_layers": 2}))
    with pytest.raises(RunDirectoryError, match="no longer has \\({'bf16_first_layers': 2}\\)"):
        run(tmp_path, resume=True, seed=3)
    saved.write_text(json.dumps(legacy | {"precision": "bf16", "bf16_first_layers": 0}))
    with pytest.raises(RunDirectoryError, match="trained with precision bf16 \\(now fp32\\)"):
        run(tmp_path, resume=True, seed=3)
    saved.write_text(json.dumps(legacy | {"bf16_first_layers": 0}))  # "auto" on a CPU meant fp32 then too
    from te_llama.train.run_dir import eval_split_seed

    assert eval_split_seed(resolve_config(output_dir=str(tmp_path / "run"), resume=True)) == 3  # its old split
    assert run(tmp_path, resume=True, seed=3).steps == 4


# ---- signals: finish the step, save, say how to resume


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_continues_exactly(tmp_path, signum, code) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "te_llama", "finetune", "--output-dir", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--no-tensorboard", "--max-steps", "5000", "--max-seq-len", "64",
            "--batch-size", "4", "--save-every", "1000", "--eval-every", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-2000:]
    saved = checkpoints(out / "checkpoints")
    stopped = int(saved[-1].name.removeprefix("step-"))
    assert len(saved) == 1 and stopped >= 3
    assert f"stopped after step {stopped} of 5000; checkpoint saved in {out / 'checkpoints'}" in err
    assert "Continue with: te-llama finetune" in err and err.rstrip().endswith("--resume")
    assert "Traceback" not in err

    common = {"max_steps": 5000, "save_every": 1000, "eval_every": 1000}
    whole = train_losses(run(tmp_path, "whole", **common, stop_after_steps=stopped + 2).output_dir)
    resumed = train_losses(run(tmp_path, **common, resume=True, stop_after_steps=2).output_dir)
    assert sorted(resumed) == list(range(1, stopped + 3))
    for step in (stopped + 1, stopped + 2):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step


def test_time_based_checkpoints(tmp_path) -> None:
    result = run(tmp_path, max_steps=3, save_every=1000, save_every_minutes=1e-9, keep_last=2)
    assert [p.name for p in checkpoints(result.output_dir / "checkpoints")] == ["step-00000002", "step-00000003"]


# ---- the model source


def test_a_missing_model_path_is_a_local_error_without_any_hub_request(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    for value in ["./models/llama", "models/llama/8b", str(tmp_path / "nope"), "~/nope-te-llama"]:
        with pytest.raises(te_llama.TeLlamaError, match=f"--model {value}: no such folder"):
            run(tmp_path, model=value)
    assert not (tmp_path / "run").exists()


def test_a_hub_id_that_cannot_be_fetched_says_how_to_get_it(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(te_llama.TeLlamaError, match="hf download org/model --local-dir DIR"):
        run(tmp_path, model="org/model")


def test_checkpoint_code_is_never_run(tmp_path) -> None:
    """A checkpoint folder whose config and tokenizer name custom code (auto_map): loaded with
    transformers' own Llama classes, the custom module never imported."""
    from te_llama.model.builtin import builtin_model, builtin_tokenizer

    folder, marker = tmp_path / "ckpt", tmp_path / "code-ran"
    tokenizer = builtin_tokenizer()
    builtin_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name, key, value in [("config.json", "auto_map", {"AutoConfig": "evil.Config",
                                                          "AutoModelForCausalLM": "evil.Model"}),
                             ("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["evil.Tokenizer", None]})]:
        content = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(content | {key: value}))
    for backend in ("reference", "hf"):
        result = run(tmp_path, backend, model=str(folder), backend=backend, max_steps=1, packing=backend != "hf")
        assert result.steps == 1
    assert not marker.exists()


# ---- config files: grouped sections, the shipped example


EXAMPLE = __import__("pathlib").Path(__file__).parents[1] / "examples" / "finetune.yaml"


def test_the_example_config_names_every_option_by_group_and_runs(tmp_path) -> None:
    import yaml

    from te_llama.train.config import GROUPS

    sections = yaml.safe_load(EXAMPLE.read_text())
    assert list(sections) == list(GROUPS)
    for group, names in GROUPS.items():  # every option; the model's `path:` is commented out (built-in model)
        assert set(sections[group]) == set(names) - {"model"}, group
    config = resolve_config(EXAMPLE, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                            max_steps=2, tensorboard=False)
    assert (config.learning_rate, config.max_seq_len, config.max_steps) == (2e-5, 1024, 2)
    assert finetune(config).steps == 2


def test_grouped_config_files_map_sections_to_options(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("model:\n  path: ckpt/\nspeed:\n  precision: bf16\n  cuda_graphs: false\n"
                                     "optimization:\n  learning_rate: 1e-4\n")
    config = resolve_config(tmp_path / "c.yaml")
    assert (config.model, config.precision, config.cuda_graphs, config.learning_rate) == ("ckpt/", "bf16", False, 1e-4)
    (tmp_path / "bad.yaml").write_text("speed:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="section 'speed' has no option 'learning_rate'; it belongs in section "
                                          "'optimization'"):
        resolve_config(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("learning_rate: 1e-4\noptimization:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match="option 'learning_rate' is given twice"):
        resolve_config(tmp_path / "twice.yaml")
