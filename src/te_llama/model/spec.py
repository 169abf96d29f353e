"""Architecture spec: one normalized description of a Llama-family decoder.

Everything downstream (weight mapping, layers, conversion) reads this spec instead of a
HF config, so a field we do not understand is refused here, once, with a message that
names it, rather than silently mis-converted later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic")
Activation = Literal["swiglu", "geglu_tanh"]
# HF `hidden_act` of the gated MLP (act(gate) * up) -> the gated unit it makes. "gelu" (erf) has no TE
# kernel; Gemma's config turns its legacy "gelu" into "gelu_pytorch_tanh" itself.
GATED_ACTIVATIONS: dict[str, Activation] = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh"}
# Fields that mean mixture-of-experts when present with a non-trivial value.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# Dropout HF applies when training; te-llama's layers have none, so a nonzero value would train another model.
# (Phi-3's `embd_pdrop` is not listed: transformers' Phi3Model does not use it.)
DROPOUT_FIELDS = ("attention_dropout", "resid_pdrop")
# Relatives of the supported families, refused with what they add that te-llama does not run.
REFUSED_FAMILIES = {
    "gemma2": "Gemma 2 needs attention and final logit soft-capping (attn_logit_softcapping, "
              "final_logit_softcapping), norms after attention and MLP (post_attention_layernorm, "
              "post_feedforward_layernorm), query_pre_attn_scalar and alternating sliding-window layers",
    "gemma3": "Gemma 3 needs q/k norms with Gemma's (1 + w), norms after attention and MLP, "
              "alternating sliding-window layers with their own rope, and its multimodal wrapper",
    "gemma3_text": "Gemma 3 needs q/k norms with Gemma's (1 + w), norms after attention and MLP "
                   "(post_feedforward_layernorm) and alternating sliding-window layers with their own rope",
    "qwen3_moe": "Qwen3-MoE is a mixture-of-experts model (num_experts); only dense Qwen3 is supported",
    "qwen2_moe": "Qwen2-MoE is a mixture-of-experts model (num_experts); only dense Qwen2 is supported",
    "phimoe": "Phi-3.5-MoE is a mixture-of-experts model; only dense Phi-3 is supported",
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """What a Llama-family decoder is made of, independent of HF's config class."""

    model_type: str
    """HF `model_type` (one of SUPPORTED_MODEL_TYPES); informative only."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads: equal to num_heads for MHA, fewer for GQA, 1 for MQA."""
    head_dim: int
    """Per-head width; may differ from hidden_size // num_heads when the config sets it."""
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    """One of SUPPORTED_ROPE_TYPES; the frequencies themselves come from HF's own functions."""
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2; Llama, Qwen3 and Gemma with attention_bias)."""
    o_bias: bool
    """o_proj carries a bias (Llama, Qwen3 and Gemma with attention_bias)."""
    mlp_bias: bool
    tie_word_embeddings: bool
    vocab_size: int
    max_position_embeddings: int
    activation: Activation = "swiglu"
    """The gated MLP's unit: SiLU(gate) * up, or GELU-tanh(gate) * up (Gemma's GeGLU)."""
    norm_zero_centered: bool = False
    """The decoder's RMSNorms scale by (1 + w), not w (Gemma). Both HF and TE store w itself."""
    qk_norm: bool = False
    """RMSNorm (eps = rms_norm_eps, weight of size head_dim) on each head's queries and keys, before RoPE
    (Qwen3's q_norm / k_norm)."""
    embedding_scale: float = 1.0
    """HF multiplies the token embeddings by this (Gemma: sqrt(hidden_size), rounded to the model's dtype).
    It happens in HF's embedding module, which te-llama keeps: recorded here, never applied by the layers."""
    hf_fused_projections: bool = False
    """HF stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3); split on load, joined on save."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def layer_bias(self) -> bool:
        """TE's TransformerLayer has one `bias` switch for all its linears: on if any HF one has one."""
        return self.qkv_bias or self.o_bias or self.mlp_bias

    @classmethod
    def from_hf_config(cls, config: Any) -> "ArchitectureSpec":
        """Normalize a Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma config; refuse what we cannot run exactly."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            why = f": {REFUSED_FAMILIES[model_type]}" if model_type in REFUSED_FAMILIES else ""
            raise UnsupportedArchitectureError(
                f"model_type={model_type!r} is not supported{why}; te-llama converts "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        act = getattr(config, "hidden_act", "silu")
        if act not in GATED_ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"hidden_act={act!r} is not supported: TE runs SwiGLU ('silu') and tanh-GeGLU "
                "('gelu_pytorch_tanh') gated MLPs"
            )
        for field in MOE_FIELDS:
            value = getattr(config, field, None)
            if value:
                raise UnsupportedArchitectureError(
                    f"{field}={value!r}: mixture-of-experts models are not supported"
                )
        _refuse_dropout(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                "use_bidirectional_attention=True is not supported: te-llama's layers are causal decoders"
            )
        _refuse_sliding_window(config)
        pretraining_tp = getattr(config, "pretraining_tp", 1)
        if pretraining_tp not in (None, 1):
            raise UnsupportedArchitectureError(
                f"pretraining_tp={pretraining_tp!r} is not supported; set it to 1 (HF's own default for finetuning)"
            )

        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise UnsupportedArchitectureError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rope_type, rope_theta = _rope_fields(config)
        qkv_bias, o_bias, mlp_bias = _biases(model_type, config)
        gemma = model_type == "gemma"
        return cls(
            model_type=model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=rope_theta,
            rope_type=rope_type,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            activation=GATED_ACTIVATIONS[act],
            norm_zero_centered=gemma,
            qk_norm=model_type == "qwen3",
            embedding_scale=config.hidden_size ** 0.5 if gemma else 1.0,
            hf_fused_projections=model_type == "phi3",
        )


def _biases(model_type: str, config: Any) -> tuple[bool, bool, bool]:
    """(q/k/v, o_proj, MLP) biases, as each family's HF modules create them."""
    attention = bool(getattr(config, "attention_bias", False))
    return {
        "llama": (attention, attention, bool(getattr(config, "mlp_bias", False))),
        "mistral": (False, False, False),
        "qwen2": (True, False, False),
        "qwen3": (attention, attention, False),
        "gemma": (attention, attention, False),
        "phi3": (False, False, False),
    }[model_type]


def _refuse_dropout(config: Any) -> None:
    for field in DROPOUT_FIELDS:
        value = getattr(config, field, None)
        if value:
            raise UnsupportedArchitectureError(
                f"{field}={value!r}: dropout is not supported (te-llama's layers have none, so training would "
                f"differ from transformers'); set config.{field} = 0.0"
            )


def _rope_fields(config: Any) -> tuple[str, float]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params and isinstance(next(iter(params.values()), None), dict):
        raise UnsupportedArchitectureError(
            f"rope_parameters={params!r}: per-layer-type rope parameters are not supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        legacy = params.get("type")
        given = f" (rope_scaling type {legacy!r})" if legacy not in (None, rope_type) else ""
        raise UnsupportedArchitectureError(
            f"rope_parameters.rope_type={rope_type!r}{given} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise UnsupportedArchitectureError(
            f"partial_rotary_factor={partial!r} is not supported; rotary embedding must cover the whole head"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UnsupportedArchitectureError("rope_parameters.rope_theta is missing from the config")
    return rope_type, float(theta)


def _refuse_sliding_window(config: Any) -> None:
    """Sliding-window attention changes results only when the window is shorter than the context."""
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedArchitectureError(
            f"layer_types contains {sorted(set(layer_types) - {'full_attention'})}: "
            "sliding-window layers are not supported"
        )
    if getattr(config, "model_type", None) in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return  # their attention applies sliding_window only when use_sliding_window is set
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise UnsupportedArchitectureError(
            f"sliding_window={window} (< max_position_embeddings={config.max_position_embeddings}) "
            "is in effect and not supported; if you train on sequences no longer than the window, "
            "set config.sliding_window = None (the attention is then identical)"
        )
