"""Tiny random-weight HF configs covering the Llama family's variations (test fixtures)."""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config


def llama2_mha():
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)


def llama31_gqa_llama3_rope():
    return LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=224, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32})


def mistral_gqa():
    return MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=None,
                         max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def qwen2_bias_tied():
    return Qwen2Config(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=128)


def llama_explicit_head_dim():
    return LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)


def llama_odd_mqa_biases_linear_rope():
    """Odd widths, MQA, every HF bias on, linear rope scaling."""
    return LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                       max_position_embeddings=128,
                       rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})


def llama_dynamic_rope():
    """Dynamic NTK scaling; tests run past max_position_embeddings so the scaling is live."""
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                       rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})


ARCHITECTURES = {
    "llama2-mha": llama2_mha,
    "llama3.1-gqa-llama3-rope": llama31_gqa_llama3_rope,
    "mistral-gqa": mistral_gqa,
    "qwen2-qkv-bias-tied": qwen2_bias_tied,
    "llama-explicit-head-dim": llama_explicit_head_dim,
    "llama-odd-mqa-biases-linear-rope": llama_odd_mqa_biases_linear_rope,
    "llama-dynamic-rope": llama_dynamic_rope,
}


def _llama3_rope(original: int) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


# Realistic widths (hidden >= 1024) for the GPU checks against Transformer Engine.
GPU_ARCHITECTURES = {
    "llama2-mha": lambda: LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2752,
                                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=512),
    "llama3.1-gqa-llama3-rope": lambda: LlamaConfig(
        vocab_size=1024, hidden_size=1024, intermediate_size=3584, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
        rope_parameters=_llama3_rope(original=128)),
    "mistral-gqa": lambda: MistralConfig(vocab_size=1024, hidden_size=1024, intermediate_size=3584,
                                         num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                                         sliding_window=None, max_position_embeddings=1024,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2-qkv-bias-tied": lambda: Qwen2Config(vocab_size=1024, hidden_size=1152, intermediate_size=3072,
                                               num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                               tie_word_embeddings=True, max_position_embeddings=1024),
    # head_dim 128 != 1024 / 16 (like Mistral-Nemo); TE refuses > 128 (see te_decoder.py)
    "llama-explicit-head-dim": lambda: LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                                                   num_hidden_layers=2, num_attention_heads=16,
                                                   num_key_value_heads=4, head_dim=128,
                                                   max_position_embeddings=1024),
    "llama-odd-mqa-biases-linear-rope": lambda: LlamaConfig(
        vocab_size=1000, hidden_size=1040, intermediate_size=2800, num_hidden_layers=2,
        num_attention_heads=10, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        max_position_embeddings=1024, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    "llama-dynamic-rope": lambda: LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                                              num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                                              max_position_embeddings=128,
                                              rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                               "factor": 2.0}),
}
