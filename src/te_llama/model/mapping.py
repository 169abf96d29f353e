"""HF <-> TE `TransformerLayer` weight mapping, as pure functions over state dicts.

The map is data: `_direct_map` renames one tensor to one tensor, `_stacked_map` concatenates
several HF tensors into one TE tensor along dim 0 (gate/up into fc1; q/k/v into TE's fused
QKV in its per-group interleaving). Both speak Llama's HF names; a family that stores some of
them fused (Phi-3's `qkv_proj`, `gate_up_proj`) is split into those names first by `HF_FUSED`,
and joined again on the way back. The reverse direction is derived from the same tables.
Everything works per decoder layer, so a checkpoint can be converted shard by shard
(`stream_hf_to_te`) without two full copies of the model in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from ..errors import WeightMappingError
from .spec import ArchitectureSpec

LAYER_PREFIX = "model.layers."
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
TE_EXTRA_STATE_SUFFIX = "_extra_state"

QKV = "self_attention.layernorm_qkv."
MLP = "layernorm_mlp."
# HF tensors that hold several of Llama's, stacked along dim 0 in this order (Phi-3).
HF_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


SPLIT_MLP_NAMES = {MLP + "fc2_weight": "fc2.weight", MLP + "fc2_bias": "fc2.bias"}
"""LoRA decoder layers run fc2 as a module of its own (down_proj's adapter reads fc2's input, which TE's
fused LayerNormMLP keeps inside): the same tensors as TE's TransformerLayer, these two under that
module's names. Layers say which names they rename (`PARAMETER_RENAMES`); the map stays this one table."""


def renamed(tensors: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """`tensors` with the names in `renames` replaced (TE's TransformerLayer names -> a layer's own)."""
    return {renames.get(name, name): tensor for name, tensor in tensors.items()}


def _direct_map(spec: ArchitectureSpec, fuse_qkv: bool) -> dict[str, str]:
    """HF name -> TE name for tensors that move unchanged (names local to one decoder layer)."""
    table = {
        "input_layernorm.weight": QKV + "layer_norm_weight",
        "self_attn.o_proj.weight": "self_attention.proj.weight",
        "post_attention_layernorm.weight": MLP + "layer_norm_weight",
        "mlp.down_proj.weight": MLP + "fc2_weight",
    }
    if spec.qk_norm:
        table |= {f"self_attn.{p}_norm.weight": f"self_attention.{p}_norm.weight" for p in "qk"}
    if not fuse_qkv:
        table |= {f"self_attn.{p}_proj.weight": QKV + f"{n}_weight" for p, n in _QKV_PARTS}
        if spec.qkv_bias:
            table |= {f"self_attn.{p}_proj.bias": QKV + f"{n}_bias" for p, n in _QKV_PARTS}
    if spec.o_bias:
        table["self_attn.o_proj.bias"] = "self_attention.proj.bias"
    if spec.mlp_bias:
        table["mlp.down_proj.bias"] = MLP + "fc2_bias"
    return table


_QKV_PARTS = (("q", "query"), ("k", "key"), ("v", "value"))


def _stacked_map(spec: ArchitectureSpec, fuse_qkv: bool) -> dict[str, tuple[str, ...]]:
    """TE name -> the HF names concatenated (dim 0) to make it. Fused QKV is also interleaved."""
    table = {MLP + "fc1_weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
    if spec.mlp_bias:
        table[MLP + "fc1_bias"] = ("mlp.gate_proj.bias", "mlp.up_proj.bias")
    if fuse_qkv:
        table[QKV + "weight"] = tuple(f"self_attn.{p}_proj.weight" for p, _ in _QKV_PARTS)
        if spec.qkv_bias:
            table[QKV + "bias"] = tuple(f"self_attn.{p}_proj.bias" for p, _ in _QKV_PARTS)
    return table


def te_zero_biases(spec: ArchitectureSpec, fuse_qkv: bool) -> dict[str, int]:
    """TE biases with no HF counterpart, and their lengths.

    TE's `bias` switch covers every linear of the layer, so a model with only some HF biases
    (Qwen2: q/k/v only) gets extra TE biases. They are zero, frozen, and must stay zero.
    """
    if not spec.layer_bias:
        return {}
    extra: dict[str, int] = {}
    if not spec.qkv_bias:
        if fuse_qkv:
            extra[QKV + "bias"] = spec.q_size + 2 * spec.kv_size
        else:
            extra |= {QKV + "query_bias": spec.q_size, QKV + "key_bias": spec.kv_size,
                      QKV + "value_bias": spec.kv_size}
    if not spec.o_bias:
        extra["self_attention.proj.bias"] = spec.hidden_size
    if not spec.mlp_bias:
        extra |= {MLP + "fc1_bias": 2 * spec.intermediate_size, MLP + "fc2_bias": spec.hidden_size}
    return extra


def _llama_layer_shapes(spec: ArchitectureSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF decoder layer of this spec, in Llama's names (nothing fused), with its shape."""
    h, q, kv, ffn = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if spec.qkv_bias:
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if spec.o_bias:
        shapes["self_attn.o_proj.bias"] = (h,)
    if spec.mlp_bias:
        shapes |= {"mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,), "mlp.down_proj.bias": (h,)}
    if spec.qk_norm:
        shapes |= {"self_attn.q_norm.weight": (spec.head_dim,), "self_attn.k_norm.weight": (spec.head_dim,)}
    return shapes


def _hf_fused(spec: ArchitectureSpec) -> dict[str, tuple[str, ...]]:
    """HF's fused tensor -> the Llama names stacked in it, for this spec's family."""
    return HF_FUSED if spec.hf_fused_projections else {}


def hf_layer_shapes(spec: ArchitectureSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF decoder layer of this spec has, in the family's own names, with its shape."""
    shapes = _llama_layer_shapes(spec)
    for fused, parts in _hf_fused(spec).items():
        pieces = [shapes.pop(p) for p in parts]
        shapes[fused] = (sum(piece[0] for piece in pieces), *pieces[0][1:])
    return shapes


def _split_hf_fused(tensors: Mapping[str, torch.Tensor], spec: ArchitectureSpec) -> dict[str, torch.Tensor]:
    """The family's names -> Llama's: each fused tensor split (dim 0) into the tensors stacked in it."""
    out = dict(tensors)
    llama = _llama_layer_shapes(spec)
    for fused, parts in _hf_fused(spec).items():
        out |= dict(zip(parts, out.pop(fused).split([llama[p][0] for p in parts], dim=0)))
    return out


def _join_hf_fused(tensors: dict[str, torch.Tensor], spec: ArchitectureSpec) -> dict[str, torch.Tensor]:
    """Llama's names -> the family's: the inverse of `_split_hf_fused`, bit-exact."""
    for fused, parts in _hf_fused(spec).items():
        tensors[fused] = torch.cat([tensors.pop(p) for p in parts], dim=0)
    return tensors


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ArchitectureSpec) -> torch.Tensor:
    """[q; k; v] rows -> TE's fused layout: per KV group, its query heads, then its key, then its value."""
    g, r, d = spec.num_kv_heads, spec.heads_per_group, spec.head_dim
    rest = q.shape[1:]
    fused = torch.cat(
        [q.reshape(g, r * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
    )  # (g, (r + 2) * d, ...)
    return fused.reshape(g * (r + 2) * d, *rest)


def _deinterleave_qkv(fused: torch.Tensor, spec: ArchitectureSpec) -> tuple[torch.Tensor, ...]:
    g, r, d = spec.num_kv_heads, spec.heads_per_group, spec.head_dim
    rest = fused.shape[1:]
    per_group = fused.reshape(g, (r + 2) * d, *rest)
    q, k, v = per_group.split([r * d, d, d], dim=1)
    return q.reshape(g * r * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def _check_shapes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightMappingError(
            f"{where}: missing tensors {missing or 'none'}; unexpected tensors {unexpected or 'none'}. "
            "The checkpoint does not match its config (wrong model or a truncated/corrupt checkpoint)."
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise WeightMappingError(
                f"{where}{name}: shape {tuple(tensors[name].shape)} in the state dict, "
                f"{tuple(shape)} expected from the config"
            )


def hf_layer_to_te(tensors: Mapping[str, torch.Tensor], spec: ArchitectureSpec, fuse_qkv: bool,
                   where: str = "") -> dict[str, torch.Tensor]:
    """One decoder layer, HF names -> TE TransformerLayer names (names local to the layer)."""
    _check_shapes(tensors, hf_layer_shapes(spec), where)
    tensors = _split_hf_fused(tensors, spec)
    out = {te: tensors[hf] for hf, te in _direct_map(spec, fuse_qkv).items()}
    for te_name, parts in _stacked_map(spec, fuse_qkv).items():
        if te_name.startswith(QKV):
            out[te_name] = _interleave_qkv(*(tensors[p] for p in parts), spec)
        else:
            out[te_name] = torch.cat([tensors[p] for p in parts], dim=0)
    like = tensors["input_layernorm.weight"]
    for name, length in te_zero_biases(spec, fuse_qkv).items():
        out[name] = torch.zeros(length, dtype=like.dtype, device=like.device)
    return out


def te_layer_shapes(spec: ArchitectureSpec, fuse_qkv: bool) -> dict[str, tuple[int, ...]]:
    """Every parameter a TE TransformerLayer built from this spec has, with its shape."""
    hf = _llama_layer_shapes(spec)
    shapes = {te: hf[h] for h, te in _direct_map(spec, fuse_qkv).items()}
    for te_name, parts in _stacked_map(spec, fuse_qkv).items():
        shapes[te_name] = (sum(hf[p][0] for p in parts), *hf[parts[0]][1:])
    shapes |= {name: (n,) for name, n in te_zero_biases(spec, fuse_qkv).items()}
    return shapes


def te_layer_to_hf(tensors: Mapping[str, torch.Tensor], spec: ArchitectureSpec, fuse_qkv: bool,
                   where: str = "") -> dict[str, torch.Tensor]:
    """One decoder layer, TE names -> HF names; the inverse of `hf_layer_to_te`, bit-exact.

    TE's `_extra_state` (FP8 scaling metadata) has no HF meaning and is dropped. The zero-only
    TE biases may be absent (a gradient dict of frozen ones) but, if present, must be zero.
    """
    tensors = {k: v for k, v in tensors.items() if not k.endswith(TE_EXTRA_STATE_SUFFIX)}
    zero_biases = te_zero_biases(spec, fuse_qkv)
    for name in zero_biases:
        bias = tensors.pop(name, None)
        if bias is not None and bool(torch.count_nonzero(bias)):
            raise WeightMappingError(
                f"{where}{name} is non-zero, but this {spec.model_type} model has no such bias in HF "
                "format; it must stay frozen at zero (te_llama.model.convert freezes it)"
            )
    expected = {k: v for k, v in te_layer_shapes(spec, fuse_qkv).items() if k not in zero_biases}
    _check_shapes(tensors, expected, where)
    out = {hf: tensors[te] for hf, te in _direct_map(spec, fuse_qkv).items()}
    for te_name, parts in _stacked_map(spec, fuse_qkv).items():
        if te_name.startswith(QKV):
            pieces = _deinterleave_qkv(tensors[te_name], spec)
        else:
            pieces = tensors[te_name].chunk(len(parts), dim=0)
        out |= dict(zip(parts, pieces))
    return _join_hf_fused(out, spec)


def split_layer_key(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); None outside the layers."""
    match = _LAYER_KEY.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _convert_state_dict(state_dict: Mapping[str, torch.Tensor], spec: ArchitectureSpec, fuse_qkv: bool,
                        layer_fn) -> dict[str, torch.Tensor]:
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        split = split_layer_key(name)
        if split is None:
            out[name] = tensor
        else:
            per_layer.setdefault(split[0], {})[split[1]] = tensor
    for index in sorted(per_layer):
        _check_layer_index(index, spec)
        prefix = f"{LAYER_PREFIX}{index}."
        converted = layer_fn(per_layer[index], spec, fuse_qkv, where=prefix)
        out |= {prefix + k: v for k, v in converted.items()}
    return out


def _check_layer_index(index: int, spec: ArchitectureSpec) -> None:
    if index >= spec.num_layers:
        raise WeightMappingError(
            f"{LAYER_PREFIX}{index}.*: unexpected layer; the config has num_hidden_layers={spec.num_layers}"
        )


def hf_to_te(state_dict: Mapping[str, torch.Tensor], spec: ArchitectureSpec, fuse_qkv: bool = False) -> dict[str, torch.Tensor]:
    """A full (or per-layer complete) HF state dict -> TE layout; non-layer tensors pass through."""
    return _convert_state_dict(state_dict, spec, fuse_qkv, hf_layer_to_te)


def te_to_hf(state_dict: Mapping[str, torch.Tensor], spec: ArchitectureSpec, fuse_qkv: bool = False) -> dict[str, torch.Tensor]:
    """A TE-layout state dict -> HF layout; the exact inverse of `hf_to_te`."""
    return _convert_state_dict(state_dict, spec, fuse_qkv, te_layer_to_hf)


def stream_hf_to_te(tensors: Iterable[tuple[str, torch.Tensor]], spec: ArchitectureSpec,
                    fuse_qkv: bool = False) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """Convert a stream of HF (name, tensor), e.g. read shard by shard, layer by layer.

    Yields `(layer_index, te_tensors)` as soon as a layer is complete, and `(None, {name: t})`
    for tensors outside the layers. Only incomplete layers are held, so memory stays near one
    shard. Layers still incomplete at the end raise, naming what is missing.
    """
    needed = set(hf_layer_shapes(spec))
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        split = split_layer_key(name)
        if split is None:
            yield None, {name: tensor}
            continue
        index, local = split
        _check_layer_index(index, spec)
        if local not in needed:
            raise WeightMappingError(f"{name}: unexpected tensor in a {spec.model_type} decoder layer")
        layer = pending.setdefault(index, {})
        layer[local] = tensor
        if len(layer) == len(needed):
            yield index, hf_layer_to_te(pending.pop(index), spec, fuse_qkv, where=f"{LAYER_PREFIX}{index}.")
    for index, layer in sorted(pending.items()):
        raise WeightMappingError(
            f"{LAYER_PREFIX}{index}.*: missing tensors {sorted(needed - set(layer))}"
        )
