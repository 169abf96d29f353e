"""ArchitectureSpec: normalizes supported configs, refuses the rest by field and value."""

from __future__ import annotations

import pytest
from hf_configs import ARCHITECTURES
from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

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
    ],
    ids=["architecture", "activation", "rope-type", "mistral-window", "qwen2-window", "pretraining-tp", "heads"],
)
def test_unsupported_configs_are_refused_by_name(config, named: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=named.replace("(", r"\(")):
        ArchitectureSpec.from_hf_config(config)


def test_moe_field_is_refused() -> None:
    config = LlamaConfig()
    config.num_local_experts = 8
    with pytest.raises(UnsupportedArchitectureError, match="num_local_experts=8"):
        ArchitectureSpec.from_hf_config(config)
