"""The CPU block-causal attention op against the softmax(QK^T) reference, under autograd and
torch.compile, and the dispatch rule that decides when the model uses it."""
import pytest
import torch

from kernels import block_causal_attention as bca
from kernels import dispatch
from model import attention


def megatron_layout(b: int, heads: int, s: int, d: int, gen, dtype=torch.float32) -> torch.Tensor:
    """``[b, heads, s, d]`` as core attention receives it: a permuted view of ``[s, b, heads, d]``."""
    return torch.randn(s, b, heads, d, generator=gen, dtype=dtype).permute(1, 2, 0, 3).requires_grad_()


@pytest.mark.parametrize("heads, groups, s, block, window", [
    (4, 2, 70, 32, 0),   # GQA, three blocks, the last one ragged
    (3, 3, 33, 16, 0),   # no GQA, ragged
    (8, 1, 5, 32, 0),    # one KV head, shorter than a block
    (2, 2, 64, 16, 0),   # a multiple of the block
    (4, 2, 70, 16, 24),  # sliding window longer than a block, not a multiple of it
    (4, 2, 70, 16, 5),   # window shorter than a block
    (2, 1, 40, 16, 16),  # window of exactly one block
])
def test_matches_the_reference_values_and_gradients(heads, groups, s, block, window):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (megatron_layout(2, n, s, 8, gen) for n in (heads, groups, groups))
    ours = bca.block_causal_attention(q, k, v, window, block)
    ref = attention.causal_attention(q, k, v, window, backend="reference")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(ours.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_are_exact_in_float64():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (megatron_layout(1, n, 9, 4, gen, torch.float64) for n in (4, 2, 2))
    for window in (0, 6):
        assert torch.autograd.gradcheck(
            lambda q, k, v, window=window: bca.block_causal_attention(q, k, v, window, block=4), (q, k, v))


def test_the_op_registration_is_consistent():
    """Fake (meta) outputs, schema and autograd registration agree with the real op."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (megatron_layout(2, n, 40, 8, gen) for n in (4, 2, 2))
    for window in (0, 20):
        torch.library.opcheck(bca._forward, (q, k, v, 16, window))


def test_compiled_with_the_cpp_wrapper_matches_eager():
    """The trainer compiles with inductor's C++ wrapper, which checks every output's strides
    against the fake implementation's."""
    import torch._inductor.config as inductor_config

    gen = torch.Generator().manual_seed(3)
    q, k, v = (megatron_layout(2, n, 45, 8, gen) for n in (4, 2, 2))

    def loss(q, k, v):
        return (bca.block_causal_attention(q * 2, k, v, 20, 16) ** 2).sum()

    torch._dynamo.reset()
    with inductor_config.patch(cpp_wrapper=True):
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, torch.autograd.grad(loss(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_attention_takes_it_only_where_it_is_meant_to(monkeypatch):
    calls, real = [], attention.block_causal_attention
    monkeypatch.setattr(attention, "block_causal_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (megatron_layout(2, n, 24, 8, gen) for n in (4, 2, 2))
    blocked = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    blocked[1, :, 12:, :12] = True

    def used(*args, **kwargs) -> bool:
        calls.clear()
        out = attention.causal_attention(*args, **kwargs)
        ref = attention.causal_attention(*args, **{**kwargs, "backend": "reference"})
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        return bool(calls)

    assert not used(q, k, v)                           # shorter than MIN_SEQ: flash's one tile
    monkeypatch.setattr(bca, "MIN_SEQ", 16)
    assert used(q, k, v)                               # CPU, fp32, full causal
    assert used(q, k, v, window=8)                     # or a sliding window
    assert not used(q, k, v, blocked=blocked)          # documents masked: SDPA with a mask
    assert not used(q.bfloat16(), k.bfloat16(), v.bfloat16())  # low precision: flash's fp32 sums
    dispatch.set_mode("reference")
    try:
        assert not used(q, k, v)                       # model.kernels=reference: plain SDPA
    finally:
        dispatch.set_mode("auto")
    prob_bytes = bca._prob_count(2, 4, 24, bca.BLOCK, 0) * 4
    monkeypatch.setattr(bca, "MAX_PROB_BYTES", prob_bytes)
    assert used(q, k, v)                               # probabilities within the memory cap
    monkeypatch.setattr(bca, "MAX_PROB_BYTES", prob_bytes - 1)
    assert not used(q, k, v)                           # over it
    monkeypatch.setattr(bca, "MAX_SEQ", 16)
    assert not used(q, k, v)                           # longer than MAX_SEQ: O(s) memory wins


@pytest.mark.integration
def test_bench_attention_times_the_op_against_sdpa(tmp_path):
    """`bench attention --methods dense dense_ours` is the shipped command behind the op's speedups."""
    import json

    from helpers import run_cli

    out = tmp_path / "bench"
    result = run_cli("-m", "pretrain", "bench", "attention", "--out", str(out), "--min-n", "128",
                     "--max-n", "256", "--fit-range", "128", "256", "--repeats", "1", "--heads", "4",
                     "--kv-heads", "2", "--head-dim", "32", "--methods", "dense", "dense_ours")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"dense", "dense_ours"}
    assert set(results["dense_ours_over_dense"]) == {"128", "256"}
    assert all(r > 0 for r in results["dense_ours_over_dense"].values())
    assert "dense_ours / dense at N=256" in result.stdout
