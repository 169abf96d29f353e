"""LoRA adapters for te-llama's decoder layers: which projections they target, and their weights.

An adapter of a projection adds `lora_B(lora_A(dropout(x))) * alpha / rank` to that projection's
output, where `x` is the projection's own input: the normed hidden for q/k/v and gate/up, the
attention output for o_proj, the gated activation for down_proj (PEFT's `LoraLayer`, scaling
alpha / r). te-llama fuses Q/K/V into one GEMM and gate/up into fc1, but the adapters stay one
per HF projection, so their weights are PEFT's one for one: layer i's `lora.q_proj.lora_A.weight`
is PEFT's `base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight`.

Adapter weights are FP32 whatever the base's dtype (PEFT's default, `autocast_adapter_dtype`):
they are a fraction of a percent of the model, and FP32 keeps AdamW's small updates to them.
They compute in the activations' dtype (BF16 under autocast), like the base beside them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TeLlamaError
from .spec import ArchitectureSpec

LORA_PREFIX = "lora."
"""Where a LoRA decoder layer keeps its adapters (`lora.<target>.lora_A.weight`)."""
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before an `*ForCausalLM`'s own parameter names."""
ADAPTER_DTYPE = torch.float32
_ADAPTER_KEY = re.compile(r"^model\.layers\.(\d+)\.lora\.(\w+)\.(lora_[AB])\.weight$")
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight$")


class LoraError(TeLlamaError, ValueError):
    """A LoRA option or adapter te-llama cannot use (what is wrong and the fix named)."""


@dataclass(frozen=True)
class Target:
    """One HF projection an adapter can sit beside."""

    parent: str
    """"self_attn" or "mlp": where HF (and PEFT's keys) put it."""
    site: str
    """The input the adapter reads: "attention_in" (normed hidden), "attention_out" (o_proj's input),
    "mlp_in" (normed hidden), "mlp_hidden" (the gated activation, down_proj's input)."""
    outputs: tuple[str, ...]
    """The base outputs its rows add to, in order: "q", "k", "v", "o", "gate", "up", "down"."""


TARGETS: dict[str, Target] = {
    "q_proj": Target("self_attn", "attention_in", ("q",)),
    "k_proj": Target("self_attn", "attention_in", ("k",)),
    "v_proj": Target("self_attn", "attention_in", ("v",)),
    "qkv_proj": Target("self_attn", "attention_in", ("q", "k", "v")),  # Phi-3 stores q/k/v in one module
    "o_proj": Target("self_attn", "attention_out", ("o",)),
    "gate_proj": Target("mlp", "mlp_in", ("gate",)),
    "up_proj": Target("mlp", "mlp_in", ("up",)),
    "gate_up_proj": Target("mlp", "mlp_in", ("gate", "up")),  # Phi-3's gate and up in one module
    "down_proj": Target("mlp", "mlp_hidden", ("down",)),
}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def family_targets(spec: ArchitectureSpec) -> tuple[str, ...]:
    """Every linear of this family's decoder layer, by its HF module name (the default targets)."""
    return FUSED_TARGETS if spec.hf_fused_projections else LLAMA_TARGETS


def check_targets(targets: tuple[str, ...], spec: ArchitectureSpec) -> None:
    """Refuse targets this family's HF layer does not have (PEFT could not load their adapters)."""
    allowed = family_targets(spec)
    wrong = [t for t in targets if t not in allowed]
    if wrong:
        why = (f"{spec.model_type} stores q/k/v as one qkv_proj and gate/up as one gate_up_proj"
               if spec.hf_fused_projections else f"{spec.model_type} has separate q/k/v and gate/up projections")
        raise LoraError(f"--lora-targets {' '.join(wrong)}: {why}; its targets are {' '.join(allowed)}")


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scaling, dropout and targets of a model's adapters (the same in every decoder layer)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or unknown or not self.targets:
            raise LoraError(f"invalid LoRA settings: rank {self.rank} (>= 1), alpha {self.alpha} (> 0), dropout "
                            f"{self.dropout} (0 <= p < 1), targets {list(self.targets)} (from {list(TARGETS)})")

    @property
    def scaling(self) -> float:
        """PEFT's alpha / r (not rsLoRA's alpha / sqrt(r))."""
        return self.alpha / self.rank


def output_sizes(spec: ArchitectureSpec) -> dict[str, int]:
    return {"q": spec.q_size, "k": spec.kv_size, "v": spec.kv_size, "o": spec.hidden_size,
            "gate": spec.intermediate_size, "up": spec.intermediate_size, "down": spec.hidden_size}


def input_sizes(spec: ArchitectureSpec) -> dict[str, int]:
    return {"attention_in": spec.hidden_size, "attention_out": spec.q_size, "mlp_in": spec.hidden_size,
            "mlp_hidden": spec.intermediate_size}


class LoraLinear(nn.Module):
    """PEFT's pair for one projection: `lora_A` (r, in) initialized as nn.Linear is, `lora_B` (out, r) zero.
    `LoraAdapters` computes with their weights; this module only holds them under PEFT's names."""

    def __init__(self, in_features: int, out_features: int, rank: int, device: torch.device | str | None) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)  # so a new adapter changes nothing


SITE_OUTPUTS = {"attention_in": ("q", "k", "v"), "attention_out": ("o",), "mlp_in": ("gate", "up"),
                "mlp_hidden": ("down",)}
"""The base outputs each input site feeds, in the order of te-llama's fused GEMMs ([q | k | v] before
TE's per-group interleaving, [gate | up] as fc1)."""


class LoraAdapters(nn.ModuleDict):
    """One decoder layer's adapters, keyed by HF projection name; `add_to(site, base, x)` applies them.

    The adapters reading one input (q/k/v; gate/up) run as two GEMMs, whatever their number: x times
    their stacked A matrices, then that (t, n r) times their B matrices laid out block-diagonally
    in the fused output's order, accumulated onto the base GEMM's output (`addmm`). Per adapter and
    separately added (PEFT's way) the (t, out) deltas would be written, read and scaled once each
    per projection: as much memory traffic as the fused GEMM output itself, several times over."""

    def __init__(self, spec: ArchitectureSpec, lora: LoraSpec, device: torch.device | str | None = None,
                 interleaved_qkv: bool = False) -> None:
        outs, ins = output_sizes(spec), input_sizes(spec)
        super().__init__({t: LoraLinear(ins[TARGETS[t].site], sum(outs[o] for o in TARGETS[t].outputs), lora.rank,
                                        device) for t in lora.targets})
        self.lora, self._sizes = lora, outs
        self.register_buffer("qkv_order", qkv_row_order(spec, device) if interleaved_qkv else None, persistent=False)

    def _at(self, site: str) -> list[tuple[Target, LoraLinear]]:
        """The adapters reading `site`'s input, in the order of their outputs in the fused GEMM."""
        order = SITE_OUTPUTS[site]
        found = [(TARGETS[n], a) for n, a in self.items() if TARGETS[n].site == site]
        return sorted(found, key=lambda ta: order.index(ta[0].outputs[0]))

    def add_to(self, site: str, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`base` (t, out) plus what the adapters reading `x` (t, in) at `site` add to it, in base's dtype.
        Each adapter's own dropout mask (PEFT's) when dropout is on and training."""
        adapters = self._at(site)
        if not adapters:
            return base
        if self.lora.dropout and self.training:
            low = torch.cat([F.linear(F.dropout(x, self.lora.dropout, training=True), a.lora_A.weight.to(x.dtype))
                             for _, a in adapters], dim=-1)
        else:
            low = F.linear(x, torch.cat([a.lora_A.weight for _, a in adapters]).to(x.dtype))  # (t, n r)
        b = self._stacked_b(site, adapters).to(base.dtype)  # FP32 adapters, the base's dtype without autocast too
        return torch.addmm(base, (low * self.lora.scaling).to(base.dtype), b.t())

    def _stacked_b(self, site: str, adapters: list[tuple[Target, LoraLinear]]) -> torch.Tensor:
        """The B matrices block-diagonally, (fused out, n r), rows in the fused GEMM's order; zero rows
        for outputs no adapter targets."""
        device = adapters[0][1].lora_B.weight.device
        by_first = {target.outputs[0]: a.lora_B.weight for target, a in adapters}  # Phi-3's cover several
        covered = {o for target, _ in adapters for o in target.outputs}
        blocks = [by_first[o] if o in by_first else torch.zeros(self._sizes[o], 0, dtype=ADAPTER_DTYPE, device=device)
                  for o in SITE_OUTPUTS[site] if o in by_first or o not in covered]
        stacked = torch.block_diag(*blocks)
        if site == "attention_in" and self.qkv_order is not None:
            stacked = stacked.index_select(0, self.qkv_order)
        return stacked


def qkv_row_order(spec: ArchitectureSpec, device: torch.device | str | None) -> torch.Tensor:
    """For each row of TE's interleaved fused QKV output (per KV group: its query heads, its key, its
    value), the row of [q | k | v] it holds."""
    rows = torch.arange(spec.q_size + 2 * spec.kv_size, device=device)
    q, k, v = rows.split([spec.q_size, spec.kv_size, spec.kv_size])
    groups = spec.num_kv_heads
    return torch.cat([q.view(groups, -1), k.view(groups, -1), v.view(groups, -1)], dim=1).flatten()


def is_adapter(name: str) -> bool:
    """True for a model parameter name that is a LoRA adapter weight (`...lora.<target>.lora_A.weight`)."""
    return LORA_PREFIX in name and (name.startswith(LORA_PREFIX) or f".{LORA_PREFIX}" in name)


def freeze_base(model: nn.Module) -> int:
    """Only the adapters train: every other parameter (embeddings, norms, lm_head too) frozen. Returns
    the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
        trainable += param.numel() if param.requires_grad else 0
    if not trainable:
        raise LoraError("the model has no LoRA adapters to train")
    return trainable


def peft_key(name: str) -> str | None:
    """A model's adapter parameter name -> PEFT's key in adapter_model.safetensors (None: not an adapter)."""
    match = _ADAPTER_KEY.match(name)
    if match is None:
        return None
    layer, target, which = match.groups()
    return f"{PEFT_PREFIX}model.layers.{layer}.{TARGETS[target].parent}.{target}.{which}.weight"


def model_key(key: str) -> str | None:
    """PEFT's key -> the model's adapter parameter name (None: not a LoRA weight of a decoder layer)."""
    match = _PEFT_KEY.match(key)
    if match is None or match.group(3) not in TARGETS or TARGETS[match.group(3)].parent != match.group(2):
        return None
    layer, _, target, which = match.groups()
    return f"model.layers.{layer}.lora.{target}.{which}.weight"


def adapter_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a model state dict (names as the model has them), keyed by PEFT's names."""
    return {key: tensor for name, tensor in state.items() if (key := peft_key(name)) is not None}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's adapter parameters by PEFT key (their `.grad` is what PEFT's would be)."""
    return adapter_tensors(dict(model.named_parameters()))


def merged_weights(layer_tensors: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
                   scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Each targeted HF weight of one layer with its adapter merged: W + (B @ A) * scaling, as PEFT's
    `merge_and_unload` computes it (the product in the adapters' dtype, added in W's dtype).

    layer_tensors: the layer's HF tensors by local name ("self_attn.q_proj.weight");
    adapters: the layer's adapters by local name ("q_proj.lora_A.weight").
    """
    for target in sorted({name.split(".")[0] for name in adapters}):
        weight_name = f"{TARGETS[target].parent}.{target}.weight"
        weight = layer_tensors[weight_name]
        delta = (adapters[f"{target}.lora_B.weight"] @ adapters[f"{target}.lora_A.weight"]) * scaling
        yield weight_name, (weight + delta.to(weight.device)).to(weight.dtype)
