"""The sliding-window attention op (kernels/window_attention.py) against the softmax(QK^T)
reference: values and gradients, the buffers it makes (none N x N), its FlexAttention and CUDA
paths, and the dispatch rule that gives it every window past the block-causal op's reach."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import block_causal_attention as bca
from kernels import dispatch
from kernels import window_attention as wa
from model import attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def megatron_layout(b: int, heads: int, s: int, d: int, gen, dtype=torch.float32) -> torch.Tensor:
    """``[b, heads, s, d]`` as core attention receives it: a permuted view of ``[s, b, heads, d]``."""
    return torch.randn(s, b, heads, d, generator=gen, dtype=dtype).permute(1, 2, 0, 3).requires_grad_()


def inputs(b, heads, groups, s, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(megatron_layout(b, n, s, d, gen, dtype) for n in (heads, groups, groups))


def assert_matches_reference(out, q, k, v, window, tol=1e-5):
    """Values and q/k/v gradients against the reference, computed on CPU in fp32."""
    leaves = [t.detach().cpu().float().requires_grad_() for t in (q, k, v)]
    ref = attention.causal_attention(*leaves, window, backend="reference")
    torch.testing.assert_close(out.cpu().float(), ref, atol=tol, rtol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    ours = torch.autograd.grad(out, (q, k, v), grad.to(out))
    for a, b in zip(ours, torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a.cpu().float(), b, atol=tol, rtol=tol)


@pytest.mark.parametrize("b, heads, groups, s, block, window", [
    (2, 4, 2, 70, 16, 5),    # window shorter than a block; N not a multiple of the block
    (2, 4, 2, 70, 16, 16),   # window of exactly one block
    (2, 4, 2, 70, 16, 24),   # longer than a block, not a multiple of it
    (1, 6, 2, 100, 8, 40),   # several blocks of window, GQA 3:1
    (2, 3, 3, 33, 16, 20),   # no GQA, ragged last block
    (1, 8, 1, 45, 16, 44),   # one KV head, the window one short of the sequence
    (2, 2, 2, 9, 16, 4),     # shorter than a block
])
@pytest.mark.parametrize("fused", [True, False], ids=["flash", "matmul"])
def test_matches_the_reference_values_and_gradients(b, heads, groups, s, block, window, fused):
    """Both block paths: the CPU flash kernel, and the matmul one CUDA falls back to."""
    q, k, v = inputs(b, heads, groups, s)
    out = wa.window_attention_blocked(q, k, v, window, block, fused)
    assert_matches_reference(out, q, k, v, window)


def test_gradients_are_exact_in_float64():
    q, k, v = inputs(1, 4, 2, 11, d=4, seed=1, dtype=torch.float64)
    for window, fused in ((3, True), (6, True), (6, False)):  # shorter and longer than the block
        assert torch.autograd.gradcheck(
            lambda q, k, v, window=window, fused=fused: wa.window_attention_blocked(
                q, k, v, window, 4, fused), (q, k, v), fast_mode=True)


def test_bf16():
    q, k, v = inputs(2, 4, 2, 50, seed=2, dtype=torch.bfloat16)
    out = wa.window_attention_blocked(q, k, v, 12, 16)
    assert out.dtype == torch.bfloat16  # the flash kernel accumulates in fp32
    assert_matches_reference(out, q, k, v, 12, tol=2e-2)


def test_the_op_registration_is_consistent():
    """Fake (meta) outputs, schema and autograd registration agree with the real op."""
    q, k, v = inputs(2, 4, 2, 40, seed=3)
    for fused in (True, False):
        torch.library.opcheck(wa._forward, (q, k, v, 16, 20, fused))


def test_compiled_with_the_cpp_wrapper_matches_eager():
    """The trainer compiles with inductor's C++ wrapper, which checks output strides."""
    import torch._inductor.config as inductor_config

    q, k, v = inputs(2, 4, 2, 45, seed=4)

    def loss(q, k, v):
        return (wa.window_attention_blocked(q * 2, k, v, 20, 16) ** 2).sum()

    torch._dynamo.reset()
    # no graph cache: a cached graph keeps the size checks of an op's earlier fake outputs
    with inductor_config.patch(cpp_wrapper=True, fx_graph_cache=False):
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, torch.autograd.grad(loss(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class Allocations(TorchDispatchMode):
    """The element count of every new tensor any op makes while active: the returns its schema
    does not alias to an input (views, in-place and out= results alias one)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, results):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                self.sizes.append(t.numel())
        return out


def allocations(b, heads, groups, s, d, block, window, fused):
    """(shapes saved for the backward, sizes of the buffers forward and backward make)."""
    q, k, v = inputs(b, heads, groups, s, d, seed=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        wa.window_attention_blocked(q, k, v, window, block, fused)
    q, k, v = (t.detach() for t in (q, k, v))
    wa.band_mask.cache_clear()  # so that the mask is made (and counted) below
    with Allocations() as made:
        out, lse = wa.forward_blocks(q, k, v, block, window, fused)
        wa.backward_blocks(torch.ones_like(out), q, k, v, out, lse, block, window, fused)
    return saved, (q, k, v, out, lse), made.sizes


@pytest.mark.parametrize("fused", [True, False])
def test_memory_is_o_n_d_beside_one_call(fused):
    """O(N x window) and better, asserted from buffer sizes at two lengths: the backward keeps q,
    k, v, the output and the log-sum-exp (no probabilities); every buffer forward and backward
    make is either one kernel call's (the band mask [r * block, window + block - 1]; on the
    matmul path the scores of GROUP blocks, [b * g, GROUP, r * block, window + block - 1], or of
    the causal prefix, window x window per head), the same at every N, or an O(N d) copy or
    gradient, as many at 2N as at N; nothing approaches N x N."""
    b, heads, groups, d, block, window = 1, 6, 2, 32, 8, 24  # sizes that tell buffers apart
    keys, n = window + block - 1, wa.GROUP
    scores = b * heads * n * block * keys  # matmul path only
    per_call = max(scores, b * heads * n * block * d, b * groups * n * keys * d,  # q, dk of a call
                   b * heads * window * max(window, d))  # the causal prefix's scores, outputs
    large = {}
    for s in (192, 384):
        saved, tensors, sizes = allocations(b, heads, groups, s, d, block, window, fused)
        assert sorted(saved) == sorted(t.shape for t in tensors)
        padded = wa._Geometry(s, block, window).padded  # zero-padded to whole blocks
        io = b * heads * padded * d
        assert per_call < b * groups * padded * d  # the smallest O(N d) buffer, k's copy
        assert max(sizes) <= io < b * heads * s * s
        assert heads // groups * block * keys in sizes  # the band mask
        assert (scores in sizes) == (not fused)  # the flash kernel makes no scores
        large[s] = [size for size in sizes if size > per_call]
        assert sum(large[s]) <= 16 * io
    assert len(large[192]) == len(large[384])


def test_flex_attention_mask_matches_the_reference():
    """The GPU path's FlexAttention block mask, run eagerly on CPU (forward only: FlexAttention
    has no CPU backward); the compiled CUDA path is tested below where there is a GPU."""
    q, k, v = (t.detach() for t in inputs(2, 4, 2, 150, seed=6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is slow
        out = wa.window_attention_flex(q, k, v, 40, compiled=False)
    ref = attention.causal_attention(q, k, v, 40, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_attention_takes_it_for_every_window_past_the_block_op(monkeypatch):
    calls, real = [], attention.window_attention
    monkeypatch.setattr(attention, "window_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    s = bca.MAX_SEQ + 40
    q, k, v = inputs(1, 2, 1, s, seed=7)
    blocked = torch.zeros(1, 1, s, s, dtype=torch.bool)
    blocked[:, :, s // 2:, :s // 2] = True

    def used(*args, **kwargs) -> bool:
        calls.clear()
        out = attention.causal_attention(*args, **kwargs)
        ref = attention.causal_attention(*args, **{**kwargs, "backend": "reference"})
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        return bool(calls)

    assert used(q, k, v, window=100)                  # past MAX_SEQ: the window op, no N x N mask
    assert used(q.bfloat16(), k.bfloat16(), v.bfloat16(), window=100)  # any dtype
    assert not used(q, k, v, window=s)                # no window inside the sequence: dense SDPA
    assert not used(q, k, v)
    assert not used(q, k, v, window=100, blocked=blocked)  # documents: SDPA with the mask
    n = bca.MIN_SEQ  # the block op's reach
    assert not used(q[:, :, :n], k[:, :, :n], v[:, :, :n], window=16)
    dispatch.set_mode("reference")
    try:
        assert not used(q, k, v, window=100)          # model.kernels=reference: SDPA with the mask
    finally:
        dispatch.set_mode("auto")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_match_the_cpu_reference(dtype):
    """flash-attn (16-bit, if installed) or compiled FlexAttention, and the blocked fallback."""
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in inputs(2, 8, 2, 1000, 64))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_matches_reference(wa.window_attention(q, k, v, 256), q, k, v, 256, tol)
    assert_matches_reference(wa.window_attention_blocked(q, k, v, 256, fused=False), q, k, v, 256,
                             tol)


@pytest.mark.integration
def test_bench_attention_times_the_window_op_against_dense(tmp_path):
    """`bench attention` is the shipped command behind the README's window-versus-dense table."""
    import json

    from helpers import run_cli

    out = tmp_path / "bench"
    result = run_cli("-m", "pretrain", "bench", "attention", "--out", str(out), "--min-n", "1024",
                     "--max-n", "1024", "--fit-range", "1024", "1024", "--repeats", "1",
                     "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--window", "256",
                     "--methods", "dense", "sliding_window")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["sliding_window_over_dense"]) == {"1024"}
    assert results["sliding_window_over_dense"]["1024"] > 0
    assert "sliding_window / dense at N=1024" in result.stdout
