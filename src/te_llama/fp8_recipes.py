"""FP8 recipes te-llama adds to TE's own; imported only where Transformer Engine is installed.

Hopper's FP8 GEMMs can accumulate in the tensor cores' own reduced precision ("fast
accumulation") or promote partial sums to FP32 every few steps ("split accumulator"). TE's
recipes use fast accumulation in the forward GEMM only; the backward's dgrad and wgrad GEMMs,
two thirds of the FLOPs, promote. `Float8CurrentScaling` takes the choice per GEMM as
arguments; `DelayedScaling` has no such fields, and TE's layers read them from any recipe
that has them (`hasattr(recipe, "fp8_gemm_dgrad")`), so a subclass that adds them is all it takes.
The class lives at module level because TE pickles the recipe into its layers' extra state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformer_engine.common.recipe import DelayedScaling, MMParams


def fast_accumulation() -> MMParams:
    """A GEMM that accumulates in the tensor cores without FP32 promotion (faster, less exact)."""
    return MMParams(use_split_accumulator=False)


@dataclass(repr=False)
class DelayedScalingFastAccumulation(DelayedScaling):
    """TE's DelayedScaling with fast accumulation in all three GEMMs (fprop, dgrad, wgrad)."""

    fp8_gemm_fprop: MMParams = field(default_factory=fast_accumulation)
    fp8_gemm_dgrad: MMParams = field(default_factory=fast_accumulation)
    fp8_gemm_wgrad: MMParams = field(default_factory=fast_accumulation)

    def _make_repr(self) -> str:
        return (f"{super()._make_repr()}, fp8_gemm_fprop={self.fp8_gemm_fprop}, "
                f"fp8_gemm_dgrad={self.fp8_gemm_dgrad}, fp8_gemm_wgrad={self.fp8_gemm_wgrad}")
