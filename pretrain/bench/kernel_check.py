"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, and check its resources.

The tests run the kernels in Triton's interpreter, which executes kernel bodies with NumPy and
accepts code the compiler rejects (an ``if`` that gives a variable another shape, for one).
Here each op of ``bench kernels`` runs forward and backward with a stand-in driver that reports
an NVIDIA target and compiles instead of launching: Triton's own NVIDIA backend lowers every
kernel the op launches to PTX and a cubin (``ptxas`` ships with Triton), and ``ptxas -v`` reports
its registers and spills. A kernel fails the check if it does not compile or needs more shared
memory (or registers per block) than the GPU has; spills are reported, not failed. Nothing is
computed, so this proves compilation and fit, not numerics: those are the interpreter tests' job.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Opt-in shared memory per block and registers per block, by compute capability.
SHARED_BYTES = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
REGISTERS_PER_BLOCK = 65536
GPU_NAMES = {75: "T4", 80: "A100", 86: "RTX 30xx/A40", 89: "L4/RTX 40xx", 90: "H100/H200", 100: "B200"}
DTYPES = ("bfloat16", "float16", "float32")
ROWS = 256  # rows of the row-wise ops: their compiled code does not depend on it


class _CompileOnlyDriver:
    """Enough of a Triton driver for ``JITFunction.run(warmup=True)``: a target, no device."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _jit_functions():
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if name.startswith("kernels.") and module is not None:
            yield from (v for v in vars(module).values() if isinstance(v, JITFunction))


@contextlib.contextmanager
def compile_only(capability: int, launched: list):
    """Within: Triton launches compile for ``sm_<capability>`` and return without running; each
    launch appends ``(JITFunction, constexpr values, CompiledKernel)`` to ``launched``."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from kernels import dispatch

    real_run, previous_driver, previous_mode = JITFunction.run, driver._active, dispatch.mode()

    def run(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]  # kwargs also carry launch options (num_warps)
        bound = inspect.signature(self.fn).bind_partial(
            *args, **{k: v for k, v in kwargs.items() if k in names}).arguments
        constexprs = {p.name: bound[p.name] for p in self.params if p.is_constexpr and p.name in bound}
        compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((self, constexprs, compiled))
        return compiled

    def forget_targets():  # each kernel caches its target with its binder on first launch
        for fn in _jit_functions():
            fn.device_caches.clear()

    forget_targets()
    driver.set_active(_CompileOnlyDriver(capability))
    JITFunction.run = run
    dispatch.set_mode("triton")
    try:
        yield
    finally:
        JITFunction.run = real_run
        driver.set_active(previous_driver)
        dispatch.set_mode(previous_mode)
        forget_targets()


def ptxas_report(ptx: str, capability: int) -> dict:
    """Registers, spills and stack of one kernel, from ``ptxas -v`` (the ptxas Triton uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
    log = proc.stderr + proc.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"arch": arch, "registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame")}


def resource_problems(kernel: dict, capability: int) -> list[str]:
    """Why this compiled kernel could not launch on the GPU (empty: it fits)."""
    problems = []
    limit = SHARED_BYTES.get(capability)
    if limit is not None and kernel["shared_bytes"] > limit:
        problems.append(f"needs {kernel['shared_bytes']} B of shared memory, sm_{capability} "
                        f"has {limit} B per block")
    threads = 32 * kernel["num_warps"]
    if kernel["registers"] * threads > REGISTERS_PER_BLOCK:
        problems.append(f"{kernel['registers']} registers x {threads} threads exceed "
                        f"{REGISTERS_PER_BLOCK} per block")
    return problems


def _describe(value) -> object:
    return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)


def check(capability: int, dtypes=DTYPES, ops: list[str] | None = None, progress=print) -> dict:
    """Compile each op's forward and backward kernels for ``sm_<capability>`` at the GPU
    benchmark's shapes (rows cut to ``ROWS``), at the smaller CPU benchmark's, and FIM at its
    largest tile (leaf block 64 x head dim 128), per dtype."""
    import torch

    from pretrain.bench.kernels import cases

    results = {"capability": capability, "gpu": GPU_NAMES.get(capability, ""), "kernels": [],
               "errors": []}
    seen = set()
    largest_fim = [c for c in cases(gpu=True, tokens=ROWS, fim_block=64) if c.name == "fim_attention"]
    for shapes, workload in (("gpu", cases(gpu=True, tokens=ROWS)), ("cpu", cases(gpu=False)),
                             ("gpu, FIM block 64", largest_fim)):
        for case in workload:
            if ops and case.name not in ops:
                continue
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                started, launched = time.perf_counter(), []
                try:
                    with compile_only(capability, launched):
                        torch.manual_seed(0)
                        inputs = [t.requires_grad_() if t.is_floating_point() else t
                                  for t in case.make_inputs(torch.device("cpu"), dtype)]
                        out = case.fused(*inputs)
                        out.backward(torch.ones_like(out))
                except Exception as err:  # a compile error names the kernel and line
                    message = f"{type(err).__name__}: {err}"
                    results["errors"].append({"op": case.name, "dtype": dtype_name, "shapes": shapes,
                                              "error": message})
                    progress(f"sm_{capability} {case.name:>14} {dtype_name:>8} {shapes} shapes: "
                             f"FAILED\n{message}")
                    continue
                for fn, constexprs, compiled in launched:
                    if compiled.hash in seen:
                        continue
                    seen.add(compiled.hash)
                    kernel = {"op": case.name, "kernel": fn.__name__, "dtype": dtype_name,
                              "shapes": shapes, "shape": case.shape,
                              "constexprs": {k: _describe(v) for k, v in constexprs.items()},
                              "num_warps": compiled.metadata.num_warps,
                              "num_stages": compiled.metadata.num_stages,
                              "shared_bytes": compiled.metadata.shared,
                              "cubin_bytes": len(compiled.asm["cubin"]),
                              **ptxas_report(compiled.asm["ptx"], capability)}
                    kernel["problems"] = resource_problems(kernel, capability)
                    results["kernels"].append(kernel)
                progress(f"sm_{capability} {case.name:>14} {dtype_name:>8} {shapes} shapes: "
                         f"{len(launched)} launches compiled ({time.perf_counter() - started:.1f} s)")
    return results


def render_table(all_results: list[dict]) -> str:
    lines = ["| target | op | kernel | dtype | shapes | constexprs | warps | registers | spills "
             "(store/load B) | shared B | fits |", "|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for results in all_results:
        for k in results["kernels"]:
            consts = ", ".join(f"{n}={v}" for n, v in k["constexprs"].items())
            lines.append(f"| sm_{results['capability']} | {k['op']} | {k['kernel']} | {k['dtype']} | "
                         f"{k['shapes']} | {consts} | {k['num_warps']} | {k['registers']} | "
                         f"{k['spill_store_bytes']}/{k['spill_load_bytes']} | {k['shared_bytes']} | "
                         f"{'; '.join(k['problems']) or 'yes'} |")
        for e in results["errors"]:
            lines.append(f"| sm_{results['capability']} | {e['op']} | (does not compile) | {e['dtype']} "
                         f"| {e['shapes']} | | | | | | {e['error'].splitlines()[0][:120]} |")
    return "\n".join(lines) + "\n"


def _check_one(item) -> dict:
    capability, dtype, ops = item
    return check(capability, [dtype], ops)


def _check_all(capabilities: list[int], dtypes: list[str], ops: list[str] | None, jobs: int) -> list[dict]:
    """``check`` per target, its dtypes compiled in up to ``jobs`` processes at once: Triton's
    compiler and ptxas are single-threaded, and a (target, dtype) pair shares no kernel with
    another."""
    items = [(cap, dtype, ops) for cap in capabilities for dtype in dtypes]
    if jobs <= 1 or len(items) == 1:
        return [check(cap, dtypes, ops) for cap in capabilities]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(items)), mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_check_one, items))
    merged = []
    for cap in capabilities:
        mine = [r for (c, _, _), r in zip(items, parts) if c == cap]
        merged.append({**mine[0], "kernels": [k for r in mine for k in r["kernels"]],
                       "errors": [e for r in mine for e in r["errors"]]})
    return merged


def run(capabilities: list[int], dtypes=DTYPES, ops: list[str] | None = None,
        out: str | None = None, jobs: int = 1) -> int:
    """The ``check-kernels`` verb: 0 if every kernel compiles and fits every target, else 1."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("check-kernels compiles for a GPU: unset TRITON_INTERPRET (the interpreter "
                         "replaces the compiler when the kernels are imported)")
    from triton.runtime.jit import JITFunction

    from kernels import rmsnorm
    if not isinstance(rmsnorm._rmsnorm_fwd, JITFunction):
        raise SystemExit("the kernels were imported under TRITON_INTERPRET=1: run in a fresh process")
    for cap in capabilities:
        if cap not in SHARED_BYTES:
            print(f"note: no shared-memory limit known for sm_{cap}: compiled, not checked for fit")
    all_results = _check_all(capabilities, list(dtypes), ops, jobs)
    table = render_table(all_results)
    print(table)
    failures = sum(len(r["errors"]) + sum(bool(k["problems"]) for k in r["kernels"]) for r in all_results)
    spilling = sorted({(f"sm_{r['capability']}", k["kernel"], k["dtype"], k["shapes"])
                       for r in all_results for k in r["kernels"] if k["spill_store_bytes"]})
    if spilling:
        print("spilling registers (slower, not wrong): " + "; ".join(" ".join(s) for s in spilling))
    if out:
        from pretrain.bench import provenance
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        import triton
        summary = {"check": "kernels compile", "date": provenance.utc_now(), "commit": provenance.commit(),
                   "triton": triton.__version__, "targets": all_results, "failures": failures}
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "table.md").write_text(table)
        print(f"results in {out_dir / 'results.json'}, table {out_dir / 'table.md'}")
    print(f"{'FAILED' if failures else 'ok'}: {sum(len(r['kernels']) for r in all_results)} kernels "
          f"compiled for {', '.join(f'sm_{c}' for c in capabilities)}; {failures} failing")
    return 1 if failures else 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check-kernels", help="compile every Triton kernel for NVIDIA GPUs (no GPU needed)",
        description="Runs each op of `bench kernels` forward and backward with Triton's NVIDIA "
                    "backend compiling (not launching) every kernel for each target, at the GPU "
                    "benchmark's shapes and the smaller CPU ones, in each dtype; prints registers, "
                    "spills and shared memory per kernel. Exit status 1 if a kernel does not "
                    "compile or does not fit a target (shared memory, registers per block). "
                    "Proves compilation, not numerics. Needs TRITON_INTERPRET unset.")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], metavar="CC",
                   help="compute capabilities, e.g. 80 (A100) 90 (H100/H200) 100 (B200); default 80 90")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                   choices=["bfloat16", "float16", "float32"], help="default: all three")
    p.add_argument("--ops", nargs="+", default=None,
                   choices=["rmsnorm", "swiglu", "rotary", "cross_entropy", "fim_attention", "selective_scan"],
                   help="default: all")
    p.add_argument("--out", default=None, help="also write OUT/results.json and OUT/table.md")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="(target, dtype) pairs compiled in parallel processes (default: the CPU count)")
    return p


def main(args) -> int:
    if args.jobs < 1:
        raise SystemExit("check-kernels: --jobs must be at least 1")
    return run(args.arch, args.dtypes, args.ops, args.out, args.jobs)
