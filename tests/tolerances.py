"""Tolerances derived from what FP32 allows: error against a float64 oracle, not against a tensor's max.

A float32 result's rounding error depends on the machine (ISA, blocking, thread count), and on a
quantity that is analytically ~0 (a cancelling sum, like the key-bias gradient) it is the whole
value: a tolerance relative to the tensor's own largest entry then fails on some machines. Here the
float32 error of the implementation under test is measured against a float64 oracle and compared
with transformers' own float32 error against the same oracle: what FP32 allows on this machine.
The multiples are the caller's named constants (next to the test that uses them).
"""

from __future__ import annotations

import torch


def max_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest absolute difference of `value` from the float64 `oracle`, computed in float64."""
    assert value.shape == oracle.shape, (tuple(value.shape), tuple(oracle.shape))
    return float((value.detach().double() - oracle.detach().double()).abs().max())


def assert_as_accurate_as(got: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor, *,
                          error_multiple: float, floor_ulps: float, name: str) -> None:
    """`got`'s error against `oracle` <= error_multiple x `baseline`'s error + floor_ulps ulps of the oracle's scale.

    `got` and `baseline` compute the same thing in the same dtype (e.g. te-llama and transformers in
    float32); `oracle` computes it in float64 from the same inputs. The floor (in units of the
    dtype's machine epsilon times max|oracle|) covers a baseline that happens to be exact.
    """
    scale = float(oracle.detach().abs().max())
    got_error, baseline_error = max_error(got, oracle), max_error(baseline, oracle)
    allowed = error_multiple * baseline_error + floor_ulps * torch.finfo(got.dtype).eps * scale
    assert got_error <= allowed, (
        f"{name}: error against the float64 oracle {got_error:.3g} > {allowed:.3g} allowed "
        f"({error_multiple} x the baseline's {baseline_error:.3g} + {floor_ulps} ulps of {scale:.3g})"
    )
