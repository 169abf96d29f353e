"""HF <-> TE weight mapping: bit-exact round trips, TE's fused-QKV layout, streaming, errors."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import random_hf_model

from te_llama import ArchitectureSpec, WeightMappingError, hf_to_te, te_to_hf
from te_llama.model.mapping import (
    hf_layer_to_te,
    stream_hf_to_te,
    te_layer_shapes,
    te_layer_to_hf,
)


def hf_state(arch: str) -> tuple[dict[str, torch.Tensor], ArchitectureSpec]:
    model = random_hf_model(arch)
    return dict(model.state_dict()), ArchitectureSpec.from_hf_config(model.config)


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_round_trip_is_bit_exact(arch: str, fuse_qkv: bool) -> None:
    state, spec = hf_state(arch)
    back = te_to_hf(hf_to_te(state, spec, fuse_qkv), spec, fuse_qkv)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_te_shapes_match_the_layout_the_mapping_produces(arch: str, fuse_qkv: bool) -> None:
    state, spec = hf_state(arch)
    layer0 = {k.removeprefix("model.layers.0."): v for k, v in state.items() if k.startswith("model.layers.0.")}
    te = hf_layer_to_te(layer0, spec, fuse_qkv)
    assert {k: tuple(v.shape) for k, v in te.items()} == te_layer_shapes(spec, fuse_qkv)


def test_fused_qkv_uses_te_group_interleaving() -> None:
    """Per KV group g: its query heads, then key head g, then value head g (TE's interleaved layout)."""
    state, spec = hf_state("llama3.1-gqa-llama3-rope")  # 8 query heads, 2 KV groups, head_dim 16
    layer0 = {k.removeprefix("model.layers.0."): v for k, v in state.items() if k.startswith("model.layers.0.")}
    fused = hf_layer_to_te(layer0, spec, fuse_qkv=True)["self_attention.layernorm_qkv.weight"]
    d, r = spec.head_dim, spec.heads_per_group
    q, k, v = (layer0[f"self_attn.{p}_proj.weight"] for p in "qkv")
    block = (r + 2) * d
    for g in range(spec.num_kv_heads):
        rows = fused[g * block:(g + 1) * block]
        assert torch.equal(rows[: r * d], q[g * r * d:(g + 1) * r * d])
        assert torch.equal(rows[r * d: (r + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(rows[(r + 1) * d:], v[g * d:(g + 1) * d])


def test_gate_and_up_stack_into_fc1() -> None:
    state, spec = hf_state("llama2-mha")
    te = hf_to_te(state, spec)
    fc1 = te["model.layers.1.layernorm_mlp.fc1_weight"]
    assert torch.equal(fc1, torch.cat([state["model.layers.1.mlp.gate_proj.weight"],
                                       state["model.layers.1.mlp.up_proj.weight"]]))


def layer_of(state: dict[str, torch.Tensor], index: int = 0) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_phi3_fused_projections_split_into_te_tensors(fuse_qkv: bool) -> None:
    """HF's qkv_proj is [q; k; v] rows and gate_up_proj [gate; up]; TE gets them as Llama's would be."""
    state, spec = hf_state("phi3-odd-gqa-tied")  # 6 query heads, 2 KV groups, head_dim 12
    layer0 = layer_of(state)
    q, k, v = layer0["self_attn.qkv_proj.weight"].split([spec.q_size, spec.kv_size, spec.kv_size])
    te = hf_layer_to_te(layer0, spec, fuse_qkv)
    llama_like = {"input_layernorm.weight": layer0["input_layernorm.weight"], "self_attn.q_proj.weight": q,
                  "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                  "self_attn.o_proj.weight": layer0["self_attn.o_proj.weight"],
                  "post_attention_layernorm.weight": layer0["post_attention_layernorm.weight"],
                  "mlp.down_proj.weight": layer0["mlp.down_proj.weight"]}
    gate, up = layer0["mlp.gate_up_proj.weight"].chunk(2)
    llama_spec = dataclasses.replace(spec, hf_fused_projections=False)
    want = hf_layer_to_te(llama_like | {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up}, llama_spec, fuse_qkv)
    assert te.keys() == want.keys()
    assert all(torch.equal(te[name], want[name]) for name in want)
    assert torch.equal(te["layernorm_mlp.fc1_weight"], layer0["mlp.gate_up_proj.weight"])
    back = te_layer_to_hf(te, spec, fuse_qkv)
    assert back.keys() == layer0.keys() and all(torch.equal(back[n], layer0[n]) for n in layer0)


def test_qwen3_qk_norms_map_to_te_q_norm_and_k_norm() -> None:
    state, spec = hf_state("qwen3-gqa-head-dim")
    layer1 = layer_of(state, 1)
    te = hf_layer_to_te(layer1, spec, fuse_qkv=True)
    for p in "qk":
        assert torch.equal(te[f"self_attention.{p}_norm.weight"], layer1[f"self_attn.{p}_norm.weight"])
        assert te[f"self_attention.{p}_norm.weight"].shape == (spec.head_dim,)


def test_gemma_norm_weights_move_unchanged() -> None:
    """HF's GemmaRMSNorm and TE's zero_centered_gamma both store w and scale by (1 + w)."""
    state, spec = hf_state("gemma-mqa")
    te = hf_to_te(state, spec)
    assert torch.equal(te["model.layers.0.self_attention.layernorm_qkv.layer_norm_weight"],
                       state["model.layers.0.input_layernorm.weight"])
    assert torch.equal(te["model.layers.0.layernorm_mlp.layer_norm_weight"],
                       state["model.layers.0.post_attention_layernorm.weight"])


@pytest.mark.parametrize("fuse_qkv", [False, True])
@pytest.mark.parametrize("arch", ["qwen2-qkv-bias-tied", "qwen3-mha-bias-tied", "phi3-odd-gqa-tied"])
def test_streaming_in_any_order_equals_whole_dict(arch: str, fuse_qkv: bool) -> None:
    state, spec = hf_state(arch)
    items = list(state.items())
    random.Random(0).shuffle(items)  # tensors of one layer spread over "shards"
    streamed: dict[str, torch.Tensor] = {}
    for index, tensors in stream_hf_to_te(iter(items), spec, fuse_qkv):
        prefix = "" if index is None else f"model.layers.{index}."
        streamed |= {prefix + k: v for k, v in tensors.items()}
    whole = hf_to_te(state, spec, fuse_qkv)
    assert set(streamed) == set(whole)
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_missing_tensor_is_named() -> None:
    state, spec = hf_state("llama2-mha")
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(WeightMappingError, match=r"model\.layers\.1\..*self_attn\.k_proj\.weight"):
        hf_to_te(state, spec)


def test_unexpected_tensor_is_named() -> None:
    state, spec = hf_state("llama2-mha")
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(3)
    with pytest.raises(WeightMappingError, match="self_attn.rotary.inv_freq"):
        hf_to_te(state, spec)


def test_extra_layer_is_refused() -> None:
    state, spec = hf_state("llama2-mha")
    state["model.layers.7.input_layernorm.weight"] = torch.ones(spec.hidden_size)
    with pytest.raises(WeightMappingError, match=r"model\.layers\.7.*num_hidden_layers=2"):
        hf_to_te(state, spec)


def test_missing_fused_phi3_tensor_is_named() -> None:
    state, spec = hf_state("phi3-mha")
    del state["model.layers.1.self_attn.qkv_proj.weight"]
    with pytest.raises(WeightMappingError, match=r"model\.layers\.1\..*self_attn\.qkv_proj\.weight"):
        hf_to_te(state, spec)
    with pytest.raises(WeightMappingError, match=r"model\.layers\.1\..*self_attn\.qkv_proj\.weight"):
        list(stream_hf_to_te(state.items(), spec))


def test_misshaped_tensor_names_both_shapes() -> None:
    state, spec = hf_state("llama2-mha")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(10, spec.hidden_size)
    with pytest.raises(WeightMappingError, match=r"up_proj\.weight: shape \(10, 64\).*\(160, 64\)"):
        hf_to_te(state, spec)


def test_streaming_reports_incomplete_layer() -> None:
    state, spec = hf_state("llama2-mha")
    del state["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(WeightMappingError, match=r"model\.layers\.0\..*mlp\.down_proj\.weight"):
        list(stream_hf_to_te(state.items(), spec))


def test_nonzero_te_only_bias_cannot_be_exported() -> None:
    state, spec = hf_state("qwen2-qkv-bias-tied")
    te = {k.removeprefix("model.layers.0."): v for k, v in hf_to_te(state, spec).items()
          if k.startswith("model.layers.0.")}
    te["self_attention.proj.bias"] = torch.ones_like(te["self_attention.proj.bias"])
    with pytest.raises(WeightMappingError, match="proj.bias is non-zero"):
        te_layer_to_hf(te, spec, fuse_qkv=False)


def test_te_extra_state_is_ignored_on_export() -> None:
    state, spec = hf_state("llama2-mha")
    te = hf_to_te(state, spec)
    te["model.layers.0.self_attention.proj._extra_state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert set(te_to_hf(te, spec)) == set(state)
