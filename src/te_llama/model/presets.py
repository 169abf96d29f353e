"""Named model shapes: tiny ones for CPU checks and CI, real ones for GPU runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import (
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)


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
    "tiny-qwen3": lambda: Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=352,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=48, tie_word_embeddings=True, max_position_embeddings=1024),
    "tiny-phi3": lambda: Phi3Config(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                                    original_max_position_embeddings=1024, sliding_window=None,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-gemma": lambda: GemmaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=1024),
    "llama2-7b": lambda: LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=131072, rms_norm_eps=1e-5,
                                     rope_parameters=_llama3_rope()),
    "llama3-70b": lambda: LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
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
    # The published config.json values of each checkpoint (model card names in the keys).
    "qwen3-8b": lambda: Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                    use_sliding_window=False, max_window_layers=36,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3-0.6b": lambda: Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                      num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True, use_sliding_window=False, max_window_layers=28,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Phi-3-mini-4k: its checkpoint sets sliding_window=2047, which te-llama refuses while in effect; a
    # window of 2047 changes nothing on sequences of up to 2047 tokens, so the shape here has none.
    "phi3-mini": lambda: Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                    max_position_embeddings=4096, original_max_position_embeddings=4096,
                                    rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Gemma's head_dim 256 runs on backend 'reference' and 'hf'; backend 'te' refuses head_dim > 128
    # (model/layers/te_decoder.py says why).
    "gemma-2b": lambda: GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                    num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                    head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gemma-7b": lambda: GemmaConfig(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                                    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                                    head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def preset_config(name: str) -> PretrainedConfig:
    """A fresh HF config for a named shape, or read from a local checkpoint/config directory."""
    if name not in PRESETS and Path(name, "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
