"""ArchitectureSpec: normalizes supported configs, refuses the rest by field and value."""

from __future__ import annotations

import pytest
from hf_configs import ARCHITECTURES
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from te_llama import ArchitectureSpec, UnsupportedArchitectureError


def test_gqa_llama3_rope_fields() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["llama3.1-gqa-llama3-rope"]())
    assert (spec.num_heads, spec.num_kv_heads, spec.heads_per_group) == (8, 2, 4)
    assert (spec.rope_type, spec.rope_theta) == ("llama3", 500000.0)


def test_explicit_head_dim_differs_from_hidden_over_heads() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["llama-explicit-head-dim"]())
    assert spec.head_dim == 32 != spec.hidden_size // spec.num_heads
    assert spec.q_size == 128 and spec.kv_size == 64


def test_qwen2_has_qkv_bias_only_and_tied_embeddings() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["qwen2-qkv-bias-tied"]())
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.tie_word_embeddings) == (True, False, False, True)
    assert spec.layer_bias


def test_llama_attention_bias_covers_o_proj() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["llama-odd-mqa-biases-linear-rope"]())
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.num_kv_heads) == (True, True, True, 1)


def test_qwen2_sliding_window_switched_off_is_accepted() -> None:
    config = Qwen2Config(sliding_window=4096, use_sliding_window=False, num_hidden_layers=2)
    assert ArchitectureSpec.from_hf_config(config).model_type == "qwen2"


def test_qwen3_has_qk_norm_and_its_own_head_dim() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["qwen3-gqa-head-dim"]())
    assert spec.qk_norm and spec.head_dim == 16 != spec.hidden_size // spec.num_heads
    assert (spec.qkv_bias, spec.o_bias, spec.activation, spec.norm_zero_centered) == (False, False, "swiglu", False)
    biased = ArchitectureSpec.from_hf_config(ARCHITECTURES["qwen3-mha-bias-tied"]())
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias, biased.tie_word_embeddings) == (True, True, False, True)
    assert ArchitectureSpec.from_hf_config(Qwen3Config(sliding_window=4096, num_hidden_layers=2)).qk_norm


def test_phi3_stores_fused_projections() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["phi3-mha"]())
    assert spec.hf_fused_projections and not spec.layer_bias and not spec.qk_norm
    assert ArchitectureSpec.from_hf_config(Phi3Config(embd_pdrop=0.1, num_hidden_layers=2)).model_type == "phi3"


def test_gemma_has_geglu_zero_centered_norms_and_scaled_embeddings() -> None:
    spec = ArchitectureSpec.from_hf_config(ARCHITECTURES["gemma-mqa"]())
    assert (spec.activation, spec.norm_zero_centered, spec.embedding_scale) == ("geglu_tanh", True, 8.0)
    assert (spec.num_kv_heads, spec.head_dim, spec.tie_word_embeddings) == (1, 32, True)
    legacy = GemmaConfig(hidden_act="gelu", num_hidden_layers=2)  # old checkpoints: transformers means tanh
    assert ArchitectureSpec.from_hf_config(legacy).activation == "geglu_tanh"


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (GPT2Config(), "model_type='gpt2'"),
        (LlamaConfig(hidden_act="gelu"), "hidden_act='gelu'"),
        (LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type='yarn'"),
        (MistralConfig(sliding_window=4096, max_position_embeddings=32768), "sliding_window=4096"),
        (Qwen2Config(use_sliding_window=True, sliding_window=1024, max_window_layers=0, num_hidden_layers=2),
         "sliding"),
        (LlamaConfig(pretraining_tp=2), "pretraining_tp=2"),
        (LlamaConfig(num_attention_heads=8, num_key_value_heads=3, hidden_size=64), "num_key_value_heads=3"),
        (Qwen3Config(use_sliding_window=True, sliding_window=1024, max_window_layers=0, num_hidden_layers=2),
         "sliding"),
        (Qwen3MoeConfig(num_hidden_layers=2), "model_type='qwen3_moe'.*mixture-of-experts"),
        (Phi3Config(sliding_window=2047, max_position_embeddings=4096), "sliding_window=2047"),
        (Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                    rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                  "original_max_position_embeddings": 64}),
         "rope_type='longrope' .rope_scaling type 'su'."),
        (Phi3Config(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (Phi3Config(resid_pdrop=0.1), "resid_pdrop=0.1.*set config.resid_pdrop = 0.0"),
        (LlamaConfig(attention_dropout=0.1), "attention_dropout=0.1"),
        (GemmaConfig(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
        (Gemma2Config(num_hidden_layers=2), "model_type='gemma2'.*attn_logit_softcapping.*final_logit_softcapping"),
        (Gemma3TextConfig(num_hidden_layers=2), "model_type='gemma3_text'.*post_feedforward_layernorm"),
        (Gemma3Config(), "model_type='gemma3'.*q/k norms"),
    ],
    ids=["architecture", "activation", "rope-type", "mistral-window", "qwen2-window", "pretraining-tp", "heads",
         "qwen3-window", "qwen3-moe", "phi3-window", "phi3-longrope", "phi3-partial-rotary", "phi3-dropout",
         "attention-dropout", "gemma-bidirectional", "gemma2", "gemma3-text", "gemma3"],
)
def test_unsupported_configs_are_refused_by_name(config, named: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=named.replace("(", r"\(")):
        ArchitectureSpec.from_hf_config(config)


def test_moe_field_is_refused() -> None:
    config = LlamaConfig()
    config.num_local_experts = 8
    with pytest.raises(UnsupportedArchitectureError, match="num_local_experts=8"):
        ArchitectureSpec.from_hf_config(config)
