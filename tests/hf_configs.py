"""Tiny random-weight HF configs covering the Llama family's variations (test fixtures)."""

from __future__ import annotations

from transformers import GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

# Phi-3's config defaults name token 32000 (pad, eos): inside the vocabulary of these tiny models instead.
PHI3_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


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


def qwen3_gqa_head_dim():
    """head_dim 16 != hidden 48 / 4 heads (Qwen3-0.6B: 128 != 1024 / 16); q/k norms."""
    return Qwen3Config(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def qwen3_mha_bias_tied():
    """attention_bias on (q/k/v and o_proj), tied embeddings."""
    return Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, attention_bias=True,
                       tie_word_embeddings=True, max_position_embeddings=128)


def qwen3_odd_mqa():
    """Odd widths, MQA, head_dim 24 > hidden / heads."""
    return Qwen3Config(vocab_size=97, hidden_size=60, intermediate_size=100, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=24, max_position_embeddings=128)


def phi3_mha():
    """Fused qkv_proj / gate_up_proj in HF; MHA as Phi-3-mini."""
    return Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      original_max_position_embeddings=128, sliding_window=None, **PHI3_TOKENS)


def phi3_odd_gqa_tied():
    """Odd widths, GQA (Phi-3-medium has 40 heads over 10 KV heads), tied embeddings."""
    return Phi3Config(vocab_size=97, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      original_max_position_embeddings=128, sliding_window=None, tie_word_embeddings=True,
                      **PHI3_TOKENS)


def gemma_mqa():
    """Gemma-2b's shape in small: MQA, heads x head_dim (4 x 32) != hidden (64), tanh-GeGLU, (1 + w) norms."""
    return GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128)


def gemma_mha_bias():
    """Gemma-7b's MHA, with attention_bias on (q/k/v and o_proj); odd hidden size."""
    return GemmaConfig(vocab_size=97, hidden_size=40, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, attention_bias=True,
                       max_position_embeddings=128)


ARCHITECTURES = {
    "llama2-mha": llama2_mha,
    "llama3.1-gqa-llama3-rope": llama31_gqa_llama3_rope,
    "mistral-gqa": mistral_gqa,
    "qwen2-qkv-bias-tied": qwen2_bias_tied,
    "llama-explicit-head-dim": llama_explicit_head_dim,
    "llama-odd-mqa-biases-linear-rope": llama_odd_mqa_biases_linear_rope,
    "llama-dynamic-rope": llama_dynamic_rope,
    "qwen3-gqa-head-dim": qwen3_gqa_head_dim,
    "qwen3-mha-bias-tied": qwen3_mha_bias_tied,
    "qwen3-odd-mqa": qwen3_odd_mqa,
    "phi3-mha": phi3_mha,
    "phi3-odd-gqa-tied": phi3_odd_gqa_tied,
    "gemma-mqa": gemma_mqa,
    "gemma-mha-bias": gemma_mha_bias,
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
    # Qwen3-0.6B's attention: 16 heads of 128 over 8 KV heads on hidden 1024; q/k norms; tied
    "qwen3-gqa-head-dim": lambda: Qwen3Config(vocab_size=1024, hidden_size=1024, intermediate_size=3072,
                                              num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                                              head_dim=128, tie_word_embeddings=True, max_position_embeddings=1024,
                                              rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Phi-3-mini's head size 96 and MHA; fused HF tensors
    "phi3-mha": lambda: Phi3Config(vocab_size=1024, hidden_size=1152, intermediate_size=3072, num_hidden_layers=2,
                                   num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                                   original_max_position_embeddings=1024, sliding_window=None, **PHI3_TOKENS),
    # Gemma-2b's MQA with heads x head_dim != hidden, at head_dim 128 (TE refuses Gemma's 256, te_decoder.py)
    "gemma-mqa": lambda: GemmaConfig(vocab_size=1024, hidden_size=1152, intermediate_size=4096, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                                     max_position_embeddings=1024),
}
