"""The embedded default: a tiny Llama-architecture model, its own HF tokenizer, sample data.

Nothing is downloaded: the tokenizer is a small BPE trained (deterministically, in well under
a second) on the bundled sample text, and wrapped as a regular `PreTrainedTokenizerFast` with
a chat template, so the whole finetune path runs exactly as it does for a real checkpoint.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .presets import preset_config

SAMPLE_TEXT = "sample_text.jsonl"
SAMPLE_CHAT = "sample_chat.jsonl"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 512


def asset_path(name: str) -> Path:
    return Path(str(resources.files("te_llama") / "assets" / name))


def training_lines() -> list[str]:
    """The sample text and every chat message's content, in file order."""
    import json

    lines = []
    for name in (SAMPLE_TEXT, SAMPLE_CHAT):
        for row in asset_path(name).read_text().splitlines():
            record = json.loads(row)
            lines += [record["text"]] if "text" in record else [m["content"] for m in record["messages"]]
    return lines


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with 512 tokens, trained on the bundled samples."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:], chat_template=CHAT_TEMPLATE,
    )


def builtin_model(tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The tiny Llama (4 layers, hidden 128, GQA, llama3 rope) sized to the tokenizer, random init."""
    config = preset_config("tiny-llama")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
