"""Timing primitives: median of repeated timed groups after warm-up (CUDA events on the GPU, perf_counter on the
CPU), FLOP counts, bf16 matmul peak, peak memory, and a strict-fp32 context for the fp32 baseline."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode


def time_per_call(fn: Callable[[], None], warmup: int, repeats: int, calls: int, device: str = "cuda") -> float:
    """Median seconds per call over `repeats` timed groups of `calls` calls, after `warmup` calls (which take
    compilation and cuDNN autotuning out of the figure). CUDA: events around each group, synchronised; CPU:
    time.perf_counter around each group."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0 / calls)
        else:
            began = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - began) / calls)
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


# dense (no sparsity) bf16 Tensor Core TFLOP/s of NVIDIA's datasheets, by a part of the device name; the first match
# counts, so the PCIe / NVL forms come before their SXM parts
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                         ("H200", 989.0), ("A100", 312.0))


def datasheet_peak_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named `device_name` (torch.cuda.get_device_name); None for a
    device not listed (and the CPU): its MFU on that basis is n/a."""
    return next((tflops for part, tflops in DATASHEET_BF16_TFLOPS if part in device_name), None)


def peak_memory_gib(fn: Callable[[], None], device: str = "cuda") -> float | None:
    """Peak GPU memory of one call; None on the CPU (not measured there)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


@contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 means fp32: TF32 off for matmuls and for cuDNN convolutions (torch's default allows TF32 in cuDNN
    convolutions), restored afterwards. Harmless on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
