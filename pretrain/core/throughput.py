"""Model FLOP utilization and memory: what the log records report besides tokens per second."""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch


def matmul_probe_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul throughput of this device: the denominator of MFU when no peak is given."""
    n = 4096 if device.type == "cuda" else 1024
    # A private generator: the global RNG stream belongs to the run (drop-path masks, resume).
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
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


def _machine_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
        hardware = f"{models[0] if models else platform.processor()} x{os.cpu_count()}"
    return f"{platform.node()} | {hardware} | {dtype} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def probe_cache_path() -> Path:
    """``$PRETRAIN_CACHE_DIR/matmul_probe.json``, by default under ``$XDG_CACHE_HOME/pretrain``
    (``~/.cache/pretrain``). Its own variable, so that moving it leaves the other caches under
    XDG_CACHE_HOME (DeepSpeed's compiled ops among them) where they are."""
    root = os.environ.get("PRETRAIN_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain"
    return Path(root) / "matmul_probe.json"


def cached_probe_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, bool]:
    """The best ``matmul_probe_tflops`` seen on this machine (per dtype, thread count and torch
    version), kept in ``probe_cache_path()``: once known, each run probes for 0.1 s instead of
    0.5 s and keeps the higher figure, so a probe taken while the machine was busy does not stick.
    Returns (TFLOP/s, whether a cached figure was known)."""
    path, key = probe_cache_path(), _machine_key(device, dtype)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    try:
        known = float(entries[key]["tflops"])
    except (KeyError, TypeError, ValueError):
        entries, known = entries if isinstance(entries, dict) else {}, None
    now = matmul_probe_tflops(device, dtype, seconds=0.5 if known is None else 0.1)
    if known is not None and known >= now:
        return known, True
    entries[key] = {"tflops": now, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)  # ranks starting together: one of the whole files wins
    except OSError:
        pass  # a read-only home: measure in full again next time
    return now, known is not None


class StartupClock:
    """Where the time from the command to the first training step goes (printed by the run)."""

    def __init__(self):
        import psutil

        self.phases = [("imports", time.time() - psutil.Process().create_time())]
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self._last))
        self._last = now

    def line(self) -> str:
        total = sum(seconds for _, seconds in self.phases)
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases if seconds >= 0.05)
        return f"start-up: {total:.1f} s to the first step ({parts})"


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory allocated (GPU) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_cpu_peak() -> int:
    """Reset Linux's peak-RSS mark (``echo 5 > /proc/self/clear_refs``); return current RSS bytes.
    Where that is not possible, the process's lifetime peak (ru_maxrss) is the fallback."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_peak_bytes() -> int:
    """Peak resident set size since the last reset_cpu_peak() (bytes)."""
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory window; returns the baseline (bytes) for peak_memory_since."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return reset_cpu_peak()


def peak_memory_since(device: torch.device, base: int) -> float:
    """MB by which the peak since reset_peak_memory rose above its baseline (GPU: allocated
    memory; CPU: resident set)."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cpu_peak_bytes()
    return max(peak - base, 0) / 2**20


def retain_freed_host_memory() -> bool:
    """Keep freed host memory in the process instead of handing it back to the kernel (glibc).

    A CPU training step frees its activations and allocates them again the next step; with
    glibc's defaults the freed top of the heap is trimmed and large blocks are unmapped, so every
    step page-faults its activations back in (thousands of minor faults per step on the tiny
    bench shape). Same idea as CUDA's caching allocator, or jemalloc/tcmalloc preloaded by CPU
    launchers. Process-wide; returns False where there is no glibc ``mallopt``."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)        # glibc's maximum: heap up to 32 MiB
                and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never trim the heap top
                and mallopt(M_TOP_PAD, 64 << 20))         # grow the heap 64 MiB at a time
