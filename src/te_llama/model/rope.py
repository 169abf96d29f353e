"""Rotary-embedding angles, computed from the HF config exactly as HF computes them.

TE's `TransformerLayer` takes RoPE as a table of angles `(s, 1, 1, d)` (float32), not as
HF's cos/sin. We take HF's own inverse frequencies (theta, llama3 / linear / dynamic
scaling) so the two cannot drift apart, and keep one table per model, on the device of the
activations, grown on demand.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..errors import UnsupportedArchitectureError
from .spec import ArchitectureSpec


def default_inverse_frequencies(spec: ArchitectureSpec, device: torch.device | None = None) -> torch.Tensor:
    """HF's `compute_default_rope_parameters`, written out (it is a per-model static method there)."""
    dim = spec.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim
    return 1.0 / (spec.rope_theta ** exponents)


class RotaryAngles:
    """Shared by all layers of one model: `table(n, device)` -> angles for positions 0..n-1."""

    def __init__(self, hf_config: Any, spec: ArchitectureSpec) -> None:
        self.hf_config = hf_config
        self.spec = spec
        self._cached: torch.Tensor | None = None

    def inverse_frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if self.spec.rope_type == "default":
            return default_inverse_frequencies(self.spec, device)
        rope_fn = ROPE_INIT_FUNCTIONS[self.spec.rope_type]
        if self.spec.rope_type == "dynamic" and seq_len > self.spec.max_position_embeddings:
            # Stateless form of HF's dynamic update: the frequencies for the current length.
            inv_freq, scaling = rope_fn(self.hf_config, device, seq_len=seq_len)
        else:
            inv_freq, scaling = rope_fn(self.hf_config, device)
        if scaling != 1.0:
            raise UnsupportedArchitectureError(
                f"rope_type={self.spec.rope_type!r} scales attention by {scaling}; not supported"
            )
        return inv_freq.to(device=device, dtype=torch.float)

    def table(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Angles `(seq_len, 1, 1, head_dim)` in float32, TE's `rotary_pos_emb` format."""
        dynamic_long = self.spec.rope_type == "dynamic" and seq_len > self.spec.max_position_embeddings
        cached = self._cached
        if dynamic_long or cached is None or cached.shape[0] < seq_len or cached.device != device:
            length = seq_len if dynamic_long else max(seq_len, cached.shape[0] if cached is not None else 0)
            inv_freq = self.inverse_frequencies(length, device)
            positions = torch.arange(length, device=device, dtype=torch.float)
            freqs = torch.outer(positions, inv_freq)  # (s, d/2), one multiply each, as HF's matmul
            table = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # (s, 1, 1, d)
            if dynamic_long:
                return table
            self._cached = cached = table
        return cached[:seq_len]
