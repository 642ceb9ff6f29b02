"""Timing primitives: synchronised CUDA-event timing (median of repeats), FLOP counts, bf16 matmul peak."""
from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def time_per_call(fn: Callable[[], None], warmup: int, repeats: int, calls: int) -> float:
    """Median seconds per call over `repeats` timed groups of `calls` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0 / calls)
    return statistics.median(times)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call (matmuls and convolutions, forward and backward when fn runs backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_tflops(size: int = 8192, repeats: int = 5) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    seconds = time_per_call(lambda: a @ b, warmup=3, repeats=repeats, calls=10)
    return 2 * size ** 3 / seconds / 1e12


def peak_memory_gib(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30
