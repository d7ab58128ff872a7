"""Wall-clock timing shared by the micro-benchmarks."""

import statistics
import time

import torch


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` in ms, after one warm-up call (synchronising CUDA around each)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
