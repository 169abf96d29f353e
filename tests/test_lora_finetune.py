"""`te-llama finetune --lora-rank` end to end on the CPU: PEFT adapter export, merge, continue, resume, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import te_llama
from te_llama.cli import main as cli_main
from te_llama.model.builtin import builtin_model, builtin_tokenizer
from te_llama.model.lora import LoraSpec, adapter_parameters, is_adapter
from te_llama.model.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, read_adapter_config
from te_llama.train.checkpoints import checkpoints
from te_llama.train.config import ConfigError, FinetuneConfig, resolve_config
from te_llama.train.metrics import read_metrics
from te_llama.train.recipe import finetune

peft = pytest.importorskip("peft")

LOGITS_REL = 1e-5  # FP32: te-llama's reference LoRA layers against PEFT on transformers' layers
RANK = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The built-in tiny Llama and its tokenizer as an HF checkpoint folder (a --model to adapt)."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = builtin_tokenizer()
    builtin_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(tmp_path, base, name: str = "run", **overrides):
    settings = {"model": str(base), "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"),
                "tensorboard": False, "max_steps": 6, "max_seq_len": 64, "batch_size": 4, "eval_every": 3,
                "save_every": 3, "learning_rate": 1e-2, "lora_rank": RANK}
    return finetune(resolve_config(**(settings | overrides)))


def train_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_final_is_a_peft_adapter_vanilla_peft_loads_and_merge_matches_peft(tmp_path, base) -> None:
    result = run(tmp_path, base, merge_lora=True)
    assert sorted(p.name for p in result.exported.iterdir() if not p.name.startswith(("tokenizer", "chat"))) == \
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((result.exported / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(TARGETS)
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"], config["lora_dropout"],
            config["task_type"], config["peft_type"]) == (str(base), RANK, 2 * RANK, 0.0, "CAUSAL_LM", "LORA")
    keys = load_file(result.exported / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * len(TARGETS) * 4 and {t.dtype for t in keys.values()} == {torch.float32}

    vanilla = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), result.exported).eval()
    ours = te_llama.from_pretrained(base, lora=read_adapter_config(result.exported)[0])
    load_peft_adapter(ours, result.exported)
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vanilla(ids).logits
        assert rel(ours(ids).logits, want) <= LOGITS_REL
        assert not torch.equal(want, AutoModelForCausalLM.from_pretrained(base)(ids).logits)  # it trained
        merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final-merged")
        assert rel(merged(ids).logits, want) <= LOGITS_REL
    reference = vanilla.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():  # PEFT's merge, bit for bit
        assert torch.equal(tensor, reference[name]), name


def test_checkpoints_hold_the_adapters_only_and_resume_exactly(tmp_path, base) -> None:
    whole = run(tmp_path, base, "whole", lora_dropout=0.1)  # dropout: the RNG state resumes too
    run(tmp_path, base, "split", lora_dropout=0.1, stop_after_steps=3)
    state = torch.load(checkpoints(tmp_path / "split" / "checkpoints")[-1] / "state.pt", weights_only=True)
    assert state["model"] and all(is_adapter(name) for name in state["model"])  # no base weight
    assert len(state["model"]) == 2 * len(TARGETS) * 4
    resumed = run(tmp_path, base, "split", lora_dropout=0.1, resume=True)
    assert train_losses(resumed.output_dir) == train_losses(whole.output_dir)  # steps 4-6 after the resume
    final, reference = load_file(resumed.exported / ADAPTER_WEIGHTS), load_file(whole.exported / ADAPTER_WEIGHTS)
    assert final.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(final[key], tensor), key


@pytest.mark.parametrize("backend", ["reference", "hf"])
def test_activation_checkpointing_trains_the_adapters_alike(tmp_path, base, backend) -> None:
    """LoRA with recompute (all layers or the first one): the same losses as without."""
    plain = train_losses(run(tmp_path, base, "plain", backend=backend).output_dir)
    for name, layers in (("all", None), ("first", 1)):
        recomputed = run(tmp_path, base, name, backend=backend, activation_checkpointing=True,
                         activation_checkpointing_layers=layers)
        assert train_losses(recomputed.output_dir) == pytest.approx(plain, rel=1e-5)


def test_continue_from_an_adapter_peft_wrote(tmp_path, base) -> None:
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=8, lora_alpha=4, lora_dropout=0.05, target_modules=["v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "adapter")
    lora, _ = read_adapter_config(tmp_path / "adapter")
    assert lora == LoraSpec(8, 4.0, 0.05, ("v_proj", "down_proj"))

    ours = te_llama.from_pretrained(base, lora=lora)
    load_peft_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(ours.eval()(ids).logits, model.eval()(ids).logits) <= LOGITS_REL

    with pytest.raises(ConfigError, match=r"trained with r 8, alpha 4, targets down_proj v_proj; --lora-rank 4 "
                                          r"conflict with it: leave them out"):
        run(tmp_path, base, "refused", lora_adapter=str(tmp_path / "adapter"))
    assert not (tmp_path / "refused").exists()
    result = run(tmp_path, base, "continued", lora_rank=None, lora_adapter=str(tmp_path / "adapter"), max_steps=2)
    assert read_adapter_config(result.exported)[0] == lora
    first_loss = train_losses(result.output_dir)[1]
    fresh = train_losses(run(tmp_path, base, "fresh", lora_rank=8, lora_alpha=4.0, lora_targets=["v_proj", "down_proj"],
                             max_steps=2).output_dir)[1]
    assert first_loss != fresh  # it started from the adapter, not from zero


def test_backend_hf_trains_peft_itself(tmp_path, base) -> None:
    result = run(tmp_path, base, backend="hf", packing=False, max_steps=3, save_every=0, merge_lora=True)
    losses = train_losses(result.output_dir)
    assert losses[3] < losses[1]
    config = json.loads((result.exported / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base) and sorted(config["target_modules"]) == sorted(TARGETS)
    vanilla = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), result.exported).eval()
    ours = te_llama.from_pretrained(base, lora=read_adapter_config(result.exported)[0])
    load_peft_adapter(ours, result.exported)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(ours(ids).logits, vanilla(ids).logits) <= LOGITS_REL
    assert (result.output_dir / "final-merged" / "model.safetensors").is_file()


@pytest.mark.parametrize(("options", "message"), [
    ({"lora_rank": 0}, "--lora-rank (lora_rank) 0 is out of range: it must be at least 1, e.g. 16 (leave --lora-rank "
                       "out for a full finetune)"),
    ({"lora_rank": -2}, "--lora-rank (lora_rank) -2 is out of range"),
    ({"lora_alpha": 0.0}, "--lora-alpha (lora_alpha) 0.0 is out of range: it must be above 0 (unset: 2 x --lora-rank)"),
    ({"lora_dropout": 1.0}, "--lora-dropout (lora_dropout) 1.0 is out of range: it is the probability of dropping an "
                            "adapter input, from 0 up to (not including) 1"),
    ({"lora_targets": ["q_proj", "w_proj"]}, "--lora-targets (lora_targets) 'w_proj' is not one of: q_proj, k_proj"),
    ({"lora_rank": None, "merge_lora": True}, "--merge-lora (merge_lora) is a LoRA option: pass --lora-rank R (or "
                                              "--lora-adapter PATH) for a LoRA finetune, or leave it out"),
    ({"lora_base": "fp8", "backend": "reference"}, "--lora-base fp8 needs --backend te (Transformer Engine's FP8 "
                                                   "weights and GEMMs), not reference; or use --lora-base bf16"),
    ({"lora_base": "fp8", "precision": "fp8-delayed-fastacc"}, "--lora-base fp8 with --precision fp8-delayed-fastacc: "
                                                               "delayed scaling takes a weight's scale from an amax"),
    ({"lora_base": "fp8", "fuse_qkv": False}, "--lora-base fp8 needs --fuse-qkv: TE cannot split one FP8 weight"),
])
def test_bad_lora_options_are_refused_when_parsed(options, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        FinetuneConfig(**({"lora_rank": RANK} | options))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without an FP8 GPU")
def test_fp8_base_without_an_fp8_gpu_is_refused_at_start(tmp_path, base) -> None:
    with pytest.raises(te_llama.TeLlamaError, match=r"--lora-base fp8 needs backend te \(Transformer Engine's FP8 "
                                                    r"weights and GEMMs on an FP8 GPU\); here: .*Use --lora-base bf16"):
        run(tmp_path, base, lora_base="fp8")
    assert not (tmp_path / "run").exists()


def test_targets_and_adapters_are_checked_before_loading(tmp_path, base, capsys) -> None:
    from te_llama.model.presets import preset_config

    folder = tmp_path / "phi3"
    preset_config("tiny-phi3").save_pretrained(folder)  # a config alone: refused before any weight is read
    with pytest.raises(te_llama.TeLlamaError, match="--lora-targets q_proj: phi3 stores q/k/v as one qkv_proj"):
        run(tmp_path, folder, lora_targets=["q_proj", "down_proj"])
    code = cli_main(["finetune", "--model", str(base), "--max-seq-len", "64", "--lora-adapter", str(tmp_path / "none"),
                     "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and f"te-llama: error: --lora-adapter {tmp_path / 'none'}: no adapter_config.json there" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_new_adapters_are_fp32_and_only_they_train(base) -> None:
    model = te_llama.from_pretrained(base, torch_dtype=torch.bfloat16, lora=LoraSpec(RANK, 8.0, 0.0, TARGETS))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n for n in dict(model.named_parameters()) if is_adapter(n)}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in trainable} == {torch.bfloat16}
    assert all(not p.any() for k, p in adapter_parameters(model).items() if "lora_B" in k)
