"""`check-kernels`: every Triton kernel compiled by Triton's real NVIDIA backend (PTX, then a cubin
by ptxas) on this CPU-only machine, and its resources checked against the GPU's limits.

These run in subprocesses without TRITON_INTERPRET: the interpreter replaces the compiler for
kernels defined while it is set, and conftest sets it for the rest of the suite."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT

KERNELS = {"_rmsnorm_fwd", "_rmsnorm_bwd", "_swiglu_fwd", "_swiglu_bwd", "_rotary_kernel", "_ce_fwd",
           "_ce_bwd", "_fim_fwd", "_fim_bwd", "_scan_fwd", "_scan_bwd"}


def _compiler_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.integration
def test_every_kernel_compiles_for_sm90_and_fits(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain", "check-kernels", "--arch", "90",
                           "--dtypes", "bfloat16", "float32", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=_compiler_env(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (target,) = results["targets"]
    assert target["capability"] == 90 and target["errors"] == []
    compiled = target["kernels"]
    for dtype in ("bfloat16", "float32"):  # forward and backward of all six ops, per dtype
        assert {k["kernel"] for k in compiled if k["dtype"] == dtype} == KERNELS
    for k in compiled:
        assert k["arch"] == "sm_90a" and k["cubin_bytes"] > 0 and 0 < k["registers"] <= 255
        assert k["problems"] == [] and k["shared_bytes"] <= 232448
    # the GPU benchmark's FIM shape compiles with its real constants (head dim 128, 8 warps)
    fim = [k for k in compiled if k["kernel"] == "_fim_bwd" and k["shapes"] == "gpu"]
    assert fim and all(k["constexprs"]["BLOCK_D"] == 128 and k["num_warps"] == 8 for k in fim)
    largest = [k for k in compiled if k["shapes"] == "gpu, FIM block 64"]
    assert {k["kernel"] for k in largest} == {"_fim_fwd", "_fim_bwd"}
    assert all(k["constexprs"]["BLOCK_B"] == 64 and k["num_stages"] == 1 for k in largest)
    assert "ok: " in proc.stdout and "| sm_90 | fim_attention | _fim_bwd |" in proc.stdout


BAD_KERNEL = textwrap.dedent('''
    import torch, triton, triton.language as tl
    from pretrain.bench.kernel_check import compile_only

    @triton.jit
    def reshape_in_if(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        if n > 0:
            offs = tl.arange(0, 2 * BLOCK)   # another shape than before the if
        tl.store(x_ptr + offs, offs.to(tl.float32))

    x = torch.zeros(64)  # n = 3, not 1: Triton folds an int argument equal to 1 into a constant
    if __import__("os").environ.get("TRITON_INTERPRET") == "1":
        reshape_in_if[(1,)](x, 3, BLOCK=16)
        print("interpreter: ran")
    else:
        launched = []
        try:
            with compile_only(90, launched):
                reshape_in_if[(1,)](x, 3, BLOCK=16)
        except Exception as err:
            print("compiler:", type(err).__name__, str(err).splitlines()[-1])
''')


@pytest.mark.integration
def test_compile_only_rejects_what_the_interpreter_runs(tmp_path):
    """The bug class check-kernels exists for (FIM's kernels had one): an `if` that gives a
    variable another shape runs in the interpreter and does not compile."""
    script = tmp_path / "bad_kernel.py"
    script.write_text(BAD_KERNEL)
    env = _compiler_env(tmp_path)
    interpreted = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                                 env={**env, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}, timeout=300)
    compiled = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert "interpreter: ran" in interpreted.stdout, interpreted.stderr[-2000:]
    assert "compiler: CompilationError" in compiled.stdout, compiled.stdout + compiled.stderr[-2000:]
    assert "redefines it as" in compiled.stdout


def test_resource_limits_name_what_does_not_fit():
    from pretrain.bench.kernel_check import resource_problems

    fits = {"shared_bytes": 120_000, "num_warps": 8, "registers": 255}
    assert resource_problems(fits, 90) == resource_problems(fits, 80) == []
    assert resource_problems(fits, 89) == ["needs 120000 B of shared memory, sm_89 has 101376 B per block"]
    too_big = {"shared_bytes": 200_000, "num_warps": 16, "registers": 200}
    problems = resource_problems(too_big, 80)
    assert problems == ["needs 200000 B of shared memory, sm_80 has 166912 B per block",
                        "200 registers x 512 threads exceed 65536 per block"]
    assert resource_problems(too_big, 90) == ["200 registers x 512 threads exceed 65536 per block"]


@pytest.mark.integration
def test_check_kernels_refuses_to_run_under_the_interpreter(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain", "check-kernels", "--ops", "rmsnorm"],
                          cwd=ROOT, env={**_compiler_env(tmp_path), "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
