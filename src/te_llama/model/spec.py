"""Architecture spec: one normalized description of a Llama-family decoder.

Everything downstream (weight mapping, layers, conversion) reads this spec instead of a
HF config, so a field we do not understand is refused here, once, with a message that
names it, rather than silently mis-converted later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic")
SUPPORTED_ACTIVATIONS = ("silu", "swish")
# Fields that mean mixture-of-experts when present with a non-trivial value.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class ArchitectureSpec:
    """What a Llama-family decoder is made of, independent of HF's config class."""

    model_type: str
    """HF `model_type` ("llama", "mistral", "qwen2"); informative only."""
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
    """q/k/v projections carry a bias (Qwen2, Llama with attention_bias)."""
    o_bias: bool
    """o_proj carries a bias (Llama with attention_bias)."""
    mlp_bias: bool
    tie_word_embeddings: bool
    vocab_size: int
    max_position_embeddings: int

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
        """Normalize a LlamaConfig / MistralConfig / Qwen2Config; refuse what we cannot run exactly."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type={model_type!r} is not supported; te-llama converts "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        act = getattr(config, "hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"hidden_act={act!r} is not supported: TE runs SwiGLU, which needs 'silu'"
            )
        for field in MOE_FIELDS:
            value = getattr(config, field, None)
            if value:
                raise UnsupportedArchitectureError(
                    f"{field}={value!r}: mixture-of-experts models are not supported"
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
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = model_type == "qwen2" or attention_bias
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
            o_bias=attention_bias and model_type == "llama",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
        )


def _rope_fields(config: Any) -> tuple[str, float]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params and isinstance(next(iter(params.values()), None), dict):
        raise UnsupportedArchitectureError(
            f"rope_parameters={params!r}: per-layer-type rope parameters are not supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope_parameters.rope_type={rope_type!r} is not supported; supported: "
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
    if getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False):
        return
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise UnsupportedArchitectureError(
            f"sliding_window={window} (< max_position_embeddings={config.max_position_embeddings}) "
            "is in effect and not supported; if you train on sequences no longer than the window, "
            "set config.sliding_window = None (the attention is then identical)"
        )
