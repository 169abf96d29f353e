"""AdamW's update as one Triton kernel per tensor: read p, g, m, v once, write p, m, v once.

Why: torch's fused AdamW moves a 7B model's 94 GB (BF16 weights, gradients and moments) in
~43 ms, ~73% of the GPU's copy bandwidth (scripts/optimizer_bench.py). A plain elementwise
kernel over each (large) tensor streams at close to copy bandwidth. Same math as
`torch.optim.AdamW` (decoupled weight decay, bias correction, FP32 arithmetic, stored in the
tensors' dtype); results can differ from torch's kernel in the last bit of BF16 rounding.

Triton is imported on first use only (CUDA machines); `available()` says whether it can run.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

import torch

BLOCK = 4096


def available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, decay, beta1, beta2, step_size, inv_sqrt_bc2, eps,
                     BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
        tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)

    return adamw_kernel


@dataclass(frozen=True)
class FP8CastTarget:
    """Where a fused update also writes its weight as FP8 E4M3 with a given (delayed-scaling) scale:
    the row-major copy and its transpose (what TE's GEMMs read on Hopper), the scale's inverse,
    and the running amax (max-accumulated, as TE's own cast does)."""

    rows: torch.Tensor
    """(n, k), float8_e4m3fn (or uint8 viewed as such)."""
    cols: torch.Tensor
    """(k, n), the transpose."""
    scale: torch.Tensor
    amax: torch.Tensor
    scale_inv: torch.Tensor


FP8_E4M3_MAX = 448.0
TILE = (64, 64)


@functools.cache
def _fp8_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_fp8_kernel(p_ptr, g_ptr, m_ptr, v_ptr, rows_ptr, cols_ptr, scale_ptr, amax_ptr, scale_inv_ptr,
                         n_rows, n_cols, decay, beta1, beta2, step_size, inv_sqrt_bc2, eps, fp8_max,
                         BN: tl.constexpr, BK: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        mask = (rn[:, None] < n_rows) & (rk[None, :] < n_cols)
        offsets = rn[:, None].to(tl.int64) * n_cols + rk[None, :]
        p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
        stored = p.to(p_ptr.dtype.element_ty)
        tl.store(p_ptr + offsets, stored, mask=mask)
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)
        # The FP8 copy is cast from the stored (rounded) weight, as a cast in the forward would read it.
        weight = stored.to(tl.float32)
        scale = tl.load(scale_ptr)
        quantized = tl.minimum(tl.maximum(weight * scale, -fp8_max), fp8_max).to(rows_ptr.dtype.element_ty)
        tl.store(rows_ptr + offsets, quantized, mask=mask)
        transposed = rk[:, None].to(tl.int64) * n_rows + rn[None, :]
        tl.store(cols_ptr + transposed, tl.trans(quantized), mask=tl.trans(mask))
        tile_amax = tl.max(tl.max(tl.where(mask, tl.abs(weight), 0.0), axis=1), axis=0)
        tl.atomic_max(amax_ptr, tile_amax)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(scale_inv_ptr, 1.0 / scale)

    return adamw_fp8_kernel


def _check_like_param(param: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != param.shape or not tensor.is_contiguous():
            raise ValueError(f"triton AdamW: {name} must be contiguous and shaped like its parameter "
                             f"{tuple(param.shape)}, got {tuple(tensor.shape)}")
    if not param.is_contiguous():
        raise ValueError(f"triton AdamW: parameter of shape {tuple(param.shape)} is not contiguous")


def adamw_update_fp8(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                     target: FP8CastTarget) -> None:
    """`adamw_update` of a 2-D weight that also writes its FP8 copy and transpose (`target`):
    the weight is read once instead of once more by a separate cast."""
    _check_like_param(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if param.dim() != 2 or target.rows.shape != param.shape or target.cols.shape != param.shape[::-1]:
        raise ValueError(f"fused FP8 cast: a 2-D weight with an FP8 copy of its shape and its transpose; got "
                         f"{tuple(param.shape)}, {tuple(target.rows.shape)}, {tuple(target.cols.shape)}")
    beta1, beta2 = betas
    n_rows, n_cols = param.shape
    _fp8_kernel()[(math.ceil(n_rows / TILE[0]), math.ceil(n_cols / TILE[1]))](
        param, grad, exp_avg, exp_avg_sq, target.rows, target.cols, target.scale, target.amax, target.scale_inv,
        n_rows, n_cols, 1.0 - lr * weight_decay, beta1, beta2, lr / (1.0 - beta1**step),
        1.0 / math.sqrt(1.0 - beta2**step), eps, FP8_E4M3_MAX, BN=TILE[0], BK=TILE[1], num_warps=8)


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step of one tensor, in place (`step` counts from 1, as torch's state does after it)."""
    _check_like_param(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    beta1, beta2 = betas
    n = param.numel()
    _kernel()[(math.ceil(n / BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, n, 1.0 - lr * weight_decay, beta1, beta2,
        lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step), eps, BLOCK=BLOCK, num_warps=8)
