"""Tolerances for comparing two float computations of one value that differ only in the order of summation
(another memory layout, a merged weight, a fused kernel), derived from the dtype and the reduction size.

Rounding-error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2 and 3.4):
a sum of n terms carries a relative error of order sqrt(n) * eps in practice (the worst case n * eps is reached
only by adversarial inputs). Two orderings differ by at most twice one ordering's error, and a few layers in
series add theirs, hence the safety factor. Nothing here is tuned on one CPU: a different vector width (AVX2 vs
AVX-512) changes the order of summation, which this bound covers by construction.
"""
from __future__ import annotations

import math

import torch

SAFETY = 8.0          # 2 orderings x up to 4 chained reductions (conv, norm, pooling, loss)


def reduction_rtol(dtype: torch.dtype, n: int) -> float:
    return SAFETY * math.sqrt(max(1, n)) * torch.finfo(dtype).eps


def assert_close_reordered(actual: torch.Tensor, expected: torch.Tensor, n: int) -> None:
    """actual == expected up to reordering a reduction of n terms; the absolute part scales with max|expected|."""
    rtol = reduction_rtol(expected.dtype, n)
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, torch.finfo(expected.dtype).tiny))
