"""Named model shapes: tiny ones for CPU checks and CI, real ones for GPU runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config


def _llama3_rope(theta: float = 500000.0, original: int = 8192) -> dict:
    return {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    # tiny: the embedded default; runs anywhere in seconds
    "tiny-llama": lambda: LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, rope_parameters=_llama3_rope(original=256)),
    "tiny-qwen2": lambda: Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=352,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=1024),
    "llama2-7b": lambda: LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=131072, rms_norm_eps=1e-5,
                                     rope_parameters=_llama3_rope()),
    "mistral-7b": lambda: MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        max_position_embeddings=32768, sliding_window=None,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2-7b": lambda: Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                    max_position_embeddings=32768,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def preset_config(name: str) -> PretrainedConfig:
    """A fresh HF config for a named shape, or read from a local checkpoint/config directory."""
    if name not in PRESETS and Path(name, "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
