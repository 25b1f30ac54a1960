"""Attention scaling: forward+backward time and peak memory against sequence length for dense
causal SDPA, the baseline's sliding window and FIM attention; fitted power-law exponents.
``sliding_window`` is the baseline's call (``causal_attention`` with ``--window``: the
sliding-window op of ``kernels/window_attention.py`` for N > window, dense SDPA itself for
N <= window, where the window hides nothing). ``dense_ours`` is dense causal attention as the
models call it (on CPU the block-causal op of ``kernels/block_causal_attention.py`` up to its
limits, SDPA elsewhere), so its ratio to ``dense`` is that op's speedup.

Each (method, N) point runs in a fresh spawned process so that its peak memory is its own: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the rise of the peak resident set (Linux VmHWM,
reset through /proc/self/clear_refs) over the resident set just before the first call. Times are the median of ``repeats``
calls after one warm-up. The methods take turns at each N (not one whole sweep after another),
so that their ratios at one N see the same load on a shared machine. With ``sweeps`` > 1 the
whole sweep is repeated, each point in a fresh process again: a point's time is the median over
sweeps, and the fitted exponent gets a 95% confidence interval from every sweep's times (the
run-to-run noise of a shared CPU is what makes a single fit flip a verdict). A point that would not fit
(estimated memory over ``memory_gb``) or fails is recorded as skipped with the reason; the sweep
goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.tools.plots import figure

METHODS = ("dense", "sliding_window", "fim")


@dataclass(frozen=True)
class Shape:
    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    window: int = 4096
    block: int = 64
    branching: int = 4
    top_k: int = 2
    dtype: str = "float32"


def _estimated_bytes(method: str, n: int, s: Shape) -> float:
    """Rough upper bound: the block op keeps probabilities; the others O(N d) and a block."""
    itemsize = 2 if s.dtype == "bfloat16" else 4
    io = 8 * s.batch * s.heads * n * s.head_dim * itemsize
    if method == "sliding_window":  # blocked copies, gradients, the band mask or a block's scores
        return 2 * io + 4 * s.batch * s.heads * 256 * (s.window + 256) * 4
    if method == "dense_ours":  # the block op keeps the probabilities for the backward
        return io + 2 * s.batch * s.heads * n * n * 4
    if method == "fim":
        keys = s.block * (1 + s.top_k) + 64
        return io + 6 * s.batch * s.heads * n * keys * itemsize
    return io


def _measure(method: str, n: int, shape: Shape, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from kernels.fim_geometry import FimGeometry
    from kernels.fim_reference import fim_attention_blocked as fim_attention
    from model.attention import causal_attention
    from pretrain.core.throughput import peak_memory_since, reset_peak_memory

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, shape.dtype)
    q = torch.randn(shape.batch, shape.heads, n, shape.head_dim, device=device, dtype=dtype)
    k = torch.randn(shape.batch, shape.kv_heads, n, shape.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step(q=q, k=k, v=v):
        if method == "dense":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif method == "sliding_window":
            out = causal_attention(q, k, v, window=shape.window)
        elif method == "dense_ours":
            out = causal_attention(q, k, v)
        else:
            levels = FimGeometry.auto_levels(q.shape[2], shape.block, shape.branching)
            out = fim_attention(q, k, v, FimGeometry(shape.block, shape.branching, levels, shape.top_k))
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None

    # One call on a few blocks first, so that lazy imports and op registration (tens of MB of
    # resident memory on CPU) are not counted as the method's memory.
    step(*(t[:, :, :2 * shape.block].detach().requires_grad_() for t in (q, k, v)))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # The peak is taken over the warm-up too (it builds cached masks).
    base = reset_peak_memory(torch.device(device))
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"n": n, "fwd_bwd_ms": statistics.median(times),
            "peak_mb": peak_memory_since(torch.device(device), base)}


def _child(args):
    method, n, shape, repeats = args
    try:
        return _measure(method, n, shape, repeats)
    except (RuntimeError, MemoryError) as exc:  # out of memory, unsupported size
        return {"n": n, "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}


def fit_exponent_ci(points: list[dict], lo: int, hi: int, level: float = 0.95) -> dict | None:
    """The slope of log(time) against log(N) over lo <= N <= hi, least squares over every sweep's
    time at every N (a point's ``sweeps_ms``, else its one time), with its ``level`` confidence
    interval (Student t on the slope's standard error; None below 3 samples over 2 sizes)."""
    from scipy.stats import linregress, t

    xs, ys = [], []
    for p in points:
        if lo <= p["n"] <= hi and "fwd_bwd_ms" in p:
            for ms in p.get("sweeps_ms", [p["fwd_bwd_ms"]]):
                xs.append(math.log(p["n"]))
                ys.append(math.log(ms))
    if len(set(xs)) < 2:
        return None
    fit = linregress(xs, ys)
    out = {"exponent": float(fit.slope), "ci": None, "level": level, "samples": len(xs)}
    if len(xs) >= 3:
        half = float(t.ppf(0.5 + level / 2, len(xs) - 2) * fit.stderr)
        out["ci"] = [float(fit.slope) - half, float(fit.slope) + half]
    return out


def _merge(samples: list[dict]) -> dict:
    """One (method, N) point from its sweeps: the median time, the largest peak, every time kept."""
    measured = [p for p in samples if "fwd_bwd_ms" in p]
    if not measured:
        return samples[0]
    point = {"n": samples[0]["n"], "fwd_bwd_ms": statistics.median(p["fwd_bwd_ms"] for p in measured),
             "peak_mb": max(p["peak_mb"] for p in measured)}
    if len(samples) > 1:
        point["sweeps_ms"] = [p["fwd_bwd_ms"] for p in measured]
    return point


def plot(results: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4.2)) as (fig, (ax_t, ax_m)):
        for name, entry in results["methods"].items():
            pts = [p for p in entry["points"] if "fwd_bwd_ms" in p]
            if not pts:
                continue
            label = f"{name} (exponent {entry['exponent']:.2f})" if entry["exponent"] else name
            ax_t.plot([p["n"] for p in pts], [p["fwd_bwd_ms"] for p in pts], "o-", label=label)
            ax_m.plot([p["n"] for p in pts], [max(p["peak_mb"], 1e-1) for p in pts], "o-", label=name)
        for ax, ylabel in ((ax_t, "forward+backward ms"), (ax_m, "peak memory MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"attention scaling on {results['device']} ({results['shape']['dtype']}, "
                     f"{results['shape']['heads']} heads / {results['shape']['kv_heads']} KV, "
                     f"d={results['shape']['head_dim']})")


def run(out: str, min_n: int = 1024, max_n: int = 32768, shape: Shape = Shape(),
        repeats: int = 3, memory_gb: float = 16.0, methods=METHODS,
        fit_range: tuple[int, int] = (4096, 16384), record: dict | None = None, sweeps: int = 1) -> dict:
    """``record``: fields the caller stores in results.json beside the measurements."""
    import torch

    sizes = [2 ** e for e in range(int(math.log2(min_n)), int(math.log2(max_n)) + 1)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"benchmark": "attention", "device": device, "shape": asdict(shape),
               "repeats": repeats, "sweeps": sweeps, "fit_range": list(fit_range), "methods": {},
               **(record or {})}
    ctx = mp.get_context("spawn")
    print(f"{'sweep':>5} {'method':>15} {'N':>7} {'fwd+bwd ms':>11} {'peak MB':>9}", flush=True)
    samples = {method: {n: [] for n in sizes} for method in methods}
    for sweep in range(sweeps):
        for n in sizes:
            for method in methods:
                if _estimated_bytes(method, n, shape) > memory_gb * 2**30:
                    point = {"n": n, "skipped": f"estimated memory over --memory-gb {memory_gb}"}
                else:
                    with ctx.Pool(1, maxtasksperchild=1) as pool:
                        point = pool.apply(_child, ((method, n, shape, repeats),))
                samples[method][n].append(point)
                if "skipped" in point:
                    print(f"{sweep:>5} {method:>15} {n:>7} skipped: {point['skipped']}", flush=True)
                else:
                    print(f"{sweep:>5} {method:>15} {n:>7} {point['fwd_bwd_ms']:>11.1f} "
                          f"{point['peak_mb']:>9.1f}", flush=True)
    points = {method: [_merge(samples[method][n]) for n in sizes] for method in methods}
    for method in methods:
        fit = fit_exponent_ci(points[method], *fit_range)
        results["methods"][method] = {"exponent": None if fit is None else fit["exponent"],
                                      "exponent_ci": None if fit is None else fit["ci"],
                                      "points": points[method]}
    measured = {m: {p["n"]: p["fwd_bwd_ms"] for p in e["points"] if "fwd_bwd_ms" in p}
                for m, e in results["methods"].items()}
    for other in ("sliding_window", "fim", "dense_ours"):
        if "dense" in measured and other in measured:
            results[f"{other}_over_dense"] = {str(n): measured[other][n] / measured["dense"][n]
                                              for n in measured[other] if n in measured["dense"]}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "attention_scaling.png")
    for m, e in results["methods"].items():
        exp = f"{e['exponent']:.3f}" if e["exponent"] is not None else "n/a"
        ci = f" (95% CI {e['exponent_ci'][0]:.3f} to {e['exponent_ci'][1]:.3f})" if e["exponent_ci"] else ""
        print(f"{m}: fitted exponent {exp}{ci} over N in [{fit_range[0]}, {fit_range[1]}]")
    for other in ("sliding_window", "fim", "dense_ours"):
        for n, ratio in results.get(f"{other}_over_dense", {}).items():
            print(f"{other} / dense at N={n}: {ratio:.3f}")
    print(f"results in {out_dir / 'results.json'}, plot {out_dir / 'attention_scaling.png'}")
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("attention", help="fwd+bwd time and memory vs sequence length: dense, "
                                         "sliding window, FIM",
                       description="Times forward+backward of dense causal SDPA, the baseline's "
                                   "sliding-window attention and FIM attention (and, with "
                                   "--methods dense_ours, dense attention as the models run it: "
                                   "on CPU our block-causal op up to 512 positions) at N = 2^k from "
                                   "--min-n to --max-n (each point in a fresh process), fits "
                                   "time ~ N^exponent over --fit-range, writes OUT/results.json "
                                   "and OUT/attention_scaling.png.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--min-n", type=int, default=1024, help="smallest sequence length (default 1024)")
    p.add_argument("--max-n", type=int, default=32768, help="largest sequence length (default 32768)")
    p.add_argument("--fit-range", type=int, nargs=2, default=[4096, 16384], metavar=("LO", "HI"),
                   help="N range of the exponent fit (default 4096 16384)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per point, median (default 3)")
    p.add_argument("--sweeps", type=int, default=1,
                   help="whole sweeps, each point in a fresh process each time: the point is their "
                   "median and the exponent gets a 95%% confidence interval (default 1)")
    p.add_argument("--memory-gb", type=float, default=16.0,
                   help="skip points estimated to need more memory (default 16)")
    p.add_argument("--methods", nargs="+", default=["dense", "sliding_window", "fim"],
                   choices=["dense", "sliding_window", "fim", "dense_ours"])
    for name, default, text in (("batch", 1, "batch size"), ("heads", 8, "query heads"),
                                ("kv-heads", 2, "key/value heads"), ("head-dim", 64, "head dim"),
                                ("window", 4096, "sliding window"), ("block", 64, "FIM leaf block"),
                                ("branching", 4, "FIM branching"), ("top-k", 2, "FIM routed blocks")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return p


def main(args) -> int:
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.window, args.block,
                  args.branching, args.top_k, args.dtype)
    run(args.out, args.min_n, args.max_n, shape, args.repeats, args.memory_gb, tuple(args.methods),
        tuple(args.fit_range), sweeps=args.sweeps)
    return 0
