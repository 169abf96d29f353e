"""Precision is configuration: one name, applied at one autocast site.

`autocast("fp32")` changes nothing (the weights' own dtype); `autocast("bf16")` runs the whole model (TE layers and HF's embeddings, norm, lm_head) in
BF16 through `torch.autocast`; the FP8 names add TE's FP8 autocast with a recipe:

    fp8          our default, currently fp8-block (TE's block scaling: 1x128 / 128x128 scales)
    fp8-delayed  TE DelayedScaling (amax history)
    fp8-current  TE Float8CurrentScaling (per-tensor scale from the current amax)
    fp8-block    TE Float8BlockScaling (1x128 / 128x128 blocks; Hopper)
    mxfp8        TE MXFP8BlockScaling (Blackwell and newer)
    fp8-delayed-fastacc, fp8-current-fastacc
                 the same recipes with Hopper's fast FP8 accumulation in the backward GEMMs
                 too (TE promotes their partial sums to FP32 by default; te_llama.fp8_recipes)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .availability import te_import_error
from .errors import BackendUnavailableError

PRECISIONS = ("fp32", "bf16", "fp8", "fp8-delayed", "fp8-current", "fp8-block", "mxfp8",
              "fp8-delayed-fastacc", "fp8-current-fastacc")
FP8_PRECISIONS = PRECISIONS[2:]
DEFAULT_FP8 = "fp8-block"
AUTO_FP8 = "fp8-delayed-fastacc"
"""What `--precision auto` trains in on an FP8 GPU: the fastest recipe whose finetune eval loss is
within 1% of BF16's on the quality benchmark (docs/PERFORMANCE.md, "Quality")."""
DELAYED_SCALING = {"amax_history_len": 16, "amax_compute_algo": "max"}
"""Delayed scaling's settings (HYBRID format: E4M3 forward, E5M2 gradients; TE's default)."""


def make_recipe(precision: str) -> Any:
    """The TE recipe object for an FP8 precision name (TE imported here, only when needed)."""
    if precision not in FP8_PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; choose one of {PRECISIONS}")
    from transformer_engine.common import recipe

    name = DEFAULT_FP8 if precision == "fp8" else precision
    if name == "fp8-delayed":
        return recipe.DelayedScaling(**DELAYED_SCALING)
    if name == "fp8-delayed-fastacc":
        from .fp8_recipes import DelayedScalingFastAccumulation

        return DelayedScalingFastAccumulation(**DELAYED_SCALING)
    if name == "fp8-current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    if name == "fp8-current-fastacc":
        from .fp8_recipes import fast_accumulation

        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID, fp8_gemm_fprop=fast_accumulation(),
                                           fp8_gemm_dgrad=fast_accumulation(), fp8_gemm_wgrad=fast_accumulation())
    if name == "fp8-block":
        return recipe.Float8BlockScaling()
    return recipe.MXFP8BlockScaling()


def auto_precision(cuda: bool, backend: str, fsdp2: bool = False) -> tuple[str, str]:
    """What `--precision auto` means here, and why: AUTO_FP8 with TE on FP8-capable GPUs (Ada,
    Hopper or newer; measured on H100/H200), in one process or under DDP (delayed scaling reduces its
    amaxes across the processes, so every replica scales alike); BF16 on other GPUs, under FSDP2 and
    with backend hf; FP32 on CPU."""
    if not cuda:
        return "fp32", "no GPU"
    if backend != "te":
        return "bf16", f"backend {backend} has no FP8"
    if fsdp2:
        return "bf16", "FSDP2 (FP8 is chosen with --precision)"
    if te_import_error():
        return "bf16", f"Transformer Engine not importable ({te_import_error()})"
    import transformer_engine.pytorch as te

    available, reason = te.is_fp8_available(return_reason=True)
    if not available:
        return "bf16", f"{torch.cuda.get_device_name()} has no FP8 ({reason})"
    return AUTO_FP8, "FP8 GPU; the fastest recipe within 1% of BF16's quality"


def check_precision_available(precision: str) -> None:
    """Raise a clear error when `precision` cannot run on this machine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; choose one of {PRECISIONS}")
    if precision in ("fp32", "bf16"):
        return
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"precision={precision!r} needs an NVIDIA GPU; none is visible (use 'bf16')")
    error = te_import_error()
    if error:
        raise BackendUnavailableError(f"precision={precision!r} needs Transformer Engine ({error}); "
                                      "install it with `pip install 'te-llama[te]'`")
    import transformer_engine.pytorch as te

    probe = {"mxfp8": te.is_mxfp8_available, "fp8-block": te.is_fp8_block_scaling_available}.get(
        precision, te.is_fp8_available)
    available, reason = probe(return_reason=True)
    if not available:
        name = torch.cuda.get_device_name()
        raise BackendUnavailableError(
            f"precision={precision!r} is not supported on {name}: {reason}. "
            "FP8 needs Hopper (H100/H200) or newer, MXFP8 needs Blackwell; use 'bf16'"
        )


@contextlib.contextmanager
def autocast(precision: str = "bf16", device_type: str | None = None) -> Iterator[None]:
    """Run forward passes of a converted model under `precision` (see module docstring)."""
    check_precision_available(precision)
    if precision == "fp32":  # weights' own dtype, no autocast
        yield
        return
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.autocast(device_type, dtype=torch.bfloat16):
        if precision == "bf16":
            yield
            return
        import transformer_engine.pytorch as te

        with te.autocast(enabled=True, recipe=make_recipe(precision)):
            yield
