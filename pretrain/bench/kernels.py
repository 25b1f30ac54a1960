"""Fused kernels against torch: forward+backward time and achieved memory bandwidth per op.

Each op runs as its torch reference in eager mode, the same reference under torch.compile, and
(on CUDA) our Triton kernel (FIM attention also against dense causal SDPA, flash on GPU; the
selective scan against mamba-ssm's CUDA kernel where installed, and not compiled: its reference
is a Python loop over the sequence), on a Mistral-7B-like shape on GPU and a smaller one on CPU. Times
are medians over timed calls after warm-up. Bandwidth counts the bytes an ideal fused forward and
backward must move (each input read, each output written, once per pass), so it is comparable
across implementations and against the device's peak. On CPU there is no Triton backend (only
its interpreter, 100-1500x slower than torch), so only the references are timed, and the output
says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pretrain.bench import provenance


@dataclass
class Case:
    name: str
    make_inputs: Callable          # (device, dtype) -> list of tensors (floating ones get grads)
    reference: Callable
    fused: Callable                # the dispatcher entry point
    ideal_bytes: Callable          # (inputs) -> bytes an ideal fwd+bwd moves
    shape: str
    baselines: dict = field(default_factory=dict)  # other implementations of the same op, by name
    compile: bool = True           # time torch.compile of the reference (not for Python loops)


def cases(gpu: bool, tokens: int | None = None, fim_block: int = 32) -> list[Case]:
    """The ops at the benchmark's shapes for a GPU or a CPU; ``tokens`` replaces the row count of
    the row-wise ops (RMSNorm, SwiGLU, cross-entropy), which the kernels' compiled code does not
    depend on (``pretrain check-kernels`` uses it to keep host memory small, and ``fim_block``
    to compile FIM's largest tile)."""
    import torch
    import torch.nn.functional as F

    from kernels import cross_entropy, fim_attention, rmsnorm, rotary, selective_scan, swiglu
    from kernels.fim_geometry import FimGeometry
    from kernels.fim_reference import fim_attention_blocked as fim_torch_path

    default_tokens, hidden, ffn = (16384, 4096, 14336) if gpu else (4096, 1024, 2816)
    tokens = tokens or default_tokens
    seq, batch, heads, head_dim = (4096, 4, 32, 128) if gpu else (1024, 4, 16, 64)
    vocab = 32768 if gpu else 8192
    # FIM at the N = 16k on GPU (default geometry: block 32, branching 2, top-2 routing)
    n_fim, fim_heads, fim_groups = (16384, 32, 8) if gpu else (2048, 8, 2)
    geom = FimGeometry(fim_block, 2, FimGeometry.auto_levels(n_fim, fim_block, 2), 2)
    branches = ("local", "hierarchical", "routed")

    scan_b, scan_d, scan_l, scan_n = (4, 4096, 2048, 16) if gpu else (2, 256, 512, 16)

    def scan_inputs(dev, dt):
        return [torch.randn(scan_b, scan_d, scan_l, device=dev, dtype=dt),
                torch.rand(scan_b, scan_d, scan_l, device=dev, dtype=dt) * 0.1,
                -torch.rand(scan_d, scan_n, device=dev, dtype=torch.float32) - 0.5,
                torch.randn(scan_b, scan_n, scan_l, device=dev, dtype=dt),
                torch.randn(scan_b, scan_n, scan_l, device=dev, dtype=dt)]

    scan_baselines = {}
    try:  # mamba-ssm's CUDA kernel, where installed
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        if gpu:
            scan_baselines["mamba-ssm"] = selective_scan_fn
    except ImportError:
        pass

    def qkv(dev, dt):
        return [torch.randn(1, fim_heads, n_fim, head_dim, device=dev, dtype=dt),
                torch.randn(1, fim_groups, n_fim, head_dim, device=dev, dtype=dt),
                torch.randn(1, fim_groups, n_fim, head_dim, device=dev, dtype=dt)]

    def nbytes(*ts):
        return sum(t.numel() * t.element_size() for t in ts)

    def angles(device):
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        half = torch.outer(torch.arange(seq, device=device).float(), inv)
        return torch.cat((half, half), -1)[:, None, None, :]

    return [
        Case("rmsnorm",
             lambda dev, dt: [torch.randn(tokens, hidden, device=dev, dtype=dt),
                              torch.ones(hidden, device=dev, dtype=dt)],
             lambda x, w: rmsnorm.rmsnorm_reference(x, w, 1e-5),
             lambda x, w: rmsnorm.rmsnorm(x, w, 1e-5),
             lambda ins: 5 * nbytes(ins[0]),  # fwd: x, y; bwd: x, dy, dx
             f"{tokens} x {hidden}"),
        Case("swiglu",
             lambda dev, dt: [torch.randn(tokens, 2 * ffn, device=dev, dtype=dt)],
             swiglu.swiglu_reference, swiglu.swiglu,
             lambda ins: nbytes(ins[0]) * 3,  # fwd: x, y (half); bwd: x, dy (half), dx
             f"{tokens} x 2*{ffn}"),
        Case("rotary",
             lambda dev, dt: [torch.randn(seq, batch, heads, head_dim, device=dev, dtype=dt)],
             lambda t: rotary.rotary_reference(t, angles(t.device)),
             lambda t: rotary.apply_rotary(t, angles(t.device)),
             lambda ins: 4 * nbytes(ins[0]),  # fwd: t, out; bwd: dy, dt
             f"[{seq}, {batch}, {heads}, {head_dim}]"),
        Case("cross_entropy",
             lambda dev, dt: [torch.randn(tokens // 2, vocab, device=dev, dtype=dt),
                              torch.randint(0, vocab, (tokens // 2,), device=dev)],
             cross_entropy.cross_entropy_reference, cross_entropy.cross_entropy,
             lambda ins: 3 * nbytes(ins[0]),  # fwd: logits; bwd: logits, dlogits
             f"{tokens // 2} x {vocab}"),
        Case("fim_attention", qkv,
             lambda q, k, v: fim_torch_path(q, k, v, geom, branches),
             lambda q, k, v: fim_attention.fim_attention(q, k, v, geom, branches),
             lambda ins: 2 * nbytes(*ins) + 2 * nbytes(ins[0]),  # fwd: q,k,v,o; bwd: again + do
             f"N={n_fim}, {fim_heads}/{fim_groups} heads, d={head_dim}, block {fim_block}",
             baselines={"dense causal SDPA": lambda q, k, v: F.scaled_dot_product_attention(
                 q, k, v, is_causal=True, enable_gqa=True)}),
        Case("selective_scan", scan_inputs, selective_scan.selective_scan_reference,
             selective_scan.selective_scan,
             lambda ins: 5 * nbytes(ins[0]) + 4 * nbytes(ins[3]),  # u, delta, y / du, ddelta, dy; B, C
             f"b={scan_b}, d={scan_d}, L={scan_l}, n={scan_n}", baselines=scan_baselines,
             compile=False),
    ]


def _time_fwd_bwd(fn, inputs, repeats: int, device) -> float:
    """Median seconds of forward + backward (gradient of the sum of outputs)."""
    import torch

    def call():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(out: str, repeats: int = 20, only: list[str] | None = None) -> dict:
    import torch

    from kernels import dispatch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    note = ("" if gpu else "no CUDA device: Triton kernels need a GPU (on CPU only Triton's "
            "interpreter exists, 100-1500x slower than torch), so only the torch references are "
            "timed here")
    if note:
        print(f"note: {note}", flush=True)
    results = {"benchmark": "kernels", "date": provenance.utc_now(), "commit": provenance.commit(),
               "hardware": provenance.hardware(), "dtype": str(dtype).replace("torch.", ""),
               "repeats": repeats, "note": note, "ops": {}}
    impls = ["torch eager", "torch.compile"] + (["triton"] if gpu else [])
    print(f"{'op':>14} {'shape':>26} {'implementation':>15} {'fwd+bwd ms':>11} {'GB/s':>8}", flush=True)
    for case in cases(gpu):
        if only and case.name not in only:
            continue
        torch.manual_seed(0)
        inputs = [t.requires_grad_() if t.is_floating_point() else t
                  for t in case.make_inputs(device, dtype)]
        ideal = case.ideal_bytes(inputs)
        entry = {"shape": case.shape, "ideal_bytes": ideal, "implementations": {}}
        for impl in [i for i in impls if case.compile or i != "torch.compile"] + list(case.baselines):
            if impl == "triton":
                dispatch.set_mode("triton")
                fn = case.fused
            elif impl in case.baselines:
                fn = case.baselines[impl]
            else:
                fn = case.reference if impl == "torch eager" else torch.compile(case.reference)
            try:
                seconds = _time_fwd_bwd(fn, inputs, repeats, device)
            finally:
                dispatch.set_mode("auto")
            entry["implementations"][impl] = {"ms": seconds * 1e3, "gb_per_s": ideal / seconds / 1e9}
            print(f"{case.name:>14} {case.shape:>26} {impl:>15} {seconds * 1e3:>11.3f} "
                  f"{ideal / seconds / 1e9:>8.1f}", flush=True)
        measured = entry["implementations"]
        fastest_ours = measured["triton" if gpu else "torch eager"]["ms"]
        if gpu:
            entry["triton_speedup_over_eager"] = measured["torch eager"]["ms"] / fastest_ours
        for name in case.baselines:
            entry[f"speedup_over_{name.replace(' ', '_')}"] = measured[name]["ms"] / fastest_ours
        results["ops"][case.name] = entry
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(render_table(results))
    print(f"results in {out_dir / 'results.json'}, table {out_dir / 'table.md'}")
    return results


def render_table(results: dict) -> str:
    order = ["torch eager", "torch.compile", "triton"]
    impls = sorted({i for op in results["ops"].values() for i in op["implementations"]},
                   key=lambda i: (order.index(i) if i in order else len(order), i))
    lines = [f"Kernels, forward + backward, {results['dtype']}, {results['hardware']['gpu'] or 'CPU'}"
             f" ({results['date']}, commit {results['commit']})", ""]
    if results["note"]:
        lines += [f"Note: {results['note']}.", ""]
    lines.append("| op | shape | " + " | ".join(f"{i} ms (GB/s)" for i in impls) + " |")
    lines.append("|---|---|" + "---:|" * len(impls))
    for name, op in results["ops"].items():
        cells = [f"{op['implementations'][i]['ms']:.3f} ({op['implementations'][i]['gb_per_s']:.0f})"
                 if i in op["implementations"] else "" for i in impls]
        lines.append(f"| {name} | {op['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("kernels", help="fused kernels vs torch eager and torch.compile: time and "
                                       "bandwidth (Triton on CUDA; references only on CPU)",
                       description="Times forward+backward of each op in kernels/ (RMSNorm, "
                                   "SwiGLU, rotary, cross-entropy, FIM attention (also against "
                                   "dense causal SDPA), selective scan) as the torch reference (eager "
                                   "and torch.compile) and, on CUDA, as our Triton kernel. Writes "
                                   "OUT/results.json and OUT/table.md.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per point, median (default 20)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   choices=["rmsnorm", "swiglu", "rotary", "cross_entropy", "fim_attention",
                            "selective_scan"],
                   help="only these ops (default: all)")
    return p


def main(args) -> int:
    run(args.out, args.repeats, args.ops)
    return 0
