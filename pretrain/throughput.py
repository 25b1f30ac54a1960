"""Model FLOP utilization and memory: what the log records report besides tokens per second."""
from __future__ import annotations

import resource
import time

import torch


def matmul_probe_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul throughput of this device: the denominator of MFU when no peak is given."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10 == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory allocated (GPU) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
