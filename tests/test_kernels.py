"""Kernels against their references (and the references against megatron's own formulas).

Without a GPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
forced with dispatch mode "triton"; with one they are compiled for real. Shapes are small and
deliberately not multiples of the kernels' blocks."""
import pytest
import torch

from kernels import cross_entropy, dispatch, fim_attention, rmsnorm, rotary, selective_scan, swiglu

DTYPES = [torch.float32, torch.float16]
# fp16: the kernels compute in fp32 and round once; compared with the fp32 reference rounded once.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def triton_mode():
    previous = dispatch.mode()
    dispatch.set_mode("triton")
    yield
    dispatch.set_mode(previous)


def check_against_reference(kernel, reference, inputs, dtype, grad_inputs=None):
    """Outputs and input gradients of ``kernel(*inputs)`` (in dtype) against ``reference`` run
    in fp32 on the same values."""
    gen = torch.Generator().manual_seed(1)
    ours_in = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_in = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in ours_in]
    out, ref = kernel(*ours_in), reference(*ref_in)
    assert out.dtype == (torch.float32 if kernel is cross_entropy.cross_entropy else dtype)
    torch.testing.assert_close(out.float(), ref.to(out.dtype).float(), **TOL[dtype])
    grad = torch.randn(out.shape, generator=gen).to(out.dtype)
    wrt = [i for i, t in enumerate(ours_in) if t.is_floating_point()]
    got = torch.autograd.grad(out, [ours_in[i] for i in wrt], grad)
    want = torch.autograd.grad(ref, [ref_in[i] for i in wrt], grad.float())
    for g_ours, g_ref in zip(got, want):
        torch.testing.assert_close(g_ours.float(), g_ref.to(g_ours.dtype).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 20), (7, 1000)])  # 20: not a power of two; 7 x 1000 rows
def test_rmsnorm_kernel_matches_reference(triton_mode, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g)
    check_against_reference(lambda a, b: rmsnorm.rmsnorm(a, b, 1e-5),
                            lambda a, b: rmsnorm.rmsnorm_reference(a, b, 1e-5), [x, w], dtype)


def test_rmsnorm_backward_splits_rows_over_programs(triton_mode):
    # 1100 rows > 512 programs: several rows per program, the last program partly empty.
    g = torch.Generator().manual_seed(0)
    check_against_reference(lambda a, b: rmsnorm.rmsnorm(a, b, 1e-6),
                            lambda a, b: rmsnorm.rmsnorm_reference(a, b, 1e-6),
                            [torch.randn(1100, 12, generator=g), torch.rand(12, generator=g)],
                            torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 2, 2 * 37), (3, 2 * 1500)])  # 1500 > one 1024 block
def test_swiglu_kernel_matches_reference(triton_mode, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    check_against_reference(swiglu.swiglu, swiglu.swiglu_reference, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [3, 20])  # 20 > one block of 16 heads
def test_rotary_kernel_matches_reference(triton_mode, dtype, heads):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(9, 2, heads, 16, generator=g)
    freqs = _angles(9, 16)
    freqs[..., 8:] *= 1.5  # unequal halves: the kernel must not assume megatron's cat((f, f))
    check_against_reference(lambda a: rotary.apply_rotary(a, freqs),
                            lambda a: rotary.rotary_reference(a, freqs), [t], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab, block", [(1000, 256), (384, 4096)])  # chunked / one chunk
def test_cross_entropy_kernel_matches_reference(triton_mode, monkeypatch, dtype, vocab, block):
    monkeypatch.setattr(cross_entropy._CrossEntropyTriton, "BLOCK", block)
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 3, vocab, generator=g)
    labels = torch.randint(0, vocab, (5, 3), generator=g)
    check_against_reference(cross_entropy.cross_entropy, cross_entropy.cross_entropy_reference,
                            [logits, labels], dtype)



FIM_CASES = [  # (block, branching, top_k, branches, n): n not a multiple of the block; block 6
    (8, 2, 2, ("local", "routed", "hierarchical"), 45),
    (6, 3, 1, ("local", "routed", "hierarchical"), 40),
    (8, 2, 3, ("local", "routed"), 40),
    (8, 4, 0, ("local", "hierarchical"), 70),
    (8, 2, 0, ("local",), 20),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])  # bf16: dots in fp32 in the interpreter
@pytest.mark.parametrize("block, branching, top_k, branches, n", FIM_CASES)
def test_fim_attention_kernel_matches_torch_path(triton_mode, dtype, block, branching, top_k,
                                                 branches, n):
    from kernels.fim_geometry import FimGeometry
    from kernels.fim_reference import fim_attention_blocked as torch_path

    geom = FimGeometry(block, branching, FimGeometry.auto_levels(n, block, branching), top_k)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 16, generator=g)          # 4 query heads over 2 KV heads (GQA)
    k, v = torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)
    # Routing is a discrete choice made from the inputs: both sides must make it on the same
    # values, so the fp32 reference runs on the fp16-rounded inputs.
    rounded = [t.to(dtype).float() for t in (q, k, v)]
    check_against_reference(lambda a, b, c: fim_attention.fim_attention(a, b, c, geom, branches),
                            lambda a, b, c: torch_path(a, b, c, geom, branches), rounded, dtype)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, length, dstate, extras", [
    (40, 19, 5, True),    # 40 channels: two blocks of 32, the second partial; 19 = 2 chunks + 3
    (8, 16, 16, False),   # exactly two chunks, state 16, no D / z / softplus
])
def test_selective_scan_kernel_matches_reference(triton_mode, monkeypatch, dtype, dim, length,
                                                 dstate, extras):
    monkeypatch.setattr(selective_scan._ScanTriton, "CHUNK", 8)
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, dim, length, generator=g), 0.5 * torch.randn(2, dim, length, generator=g)
    A = -torch.rand(dim, dstate, generator=g) - 0.5
    B, C = torch.randn(2, dstate, length, generator=g), torch.randn(2, dstate, length, generator=g)
    D, z, bias = torch.randn(dim, generator=g), torch.randn(2, dim, length, generator=g), torch.rand(dim, generator=g)
    if extras:
        kw = dict(delta_softplus=True)
        check_against_reference(
            lambda *a: selective_scan.selective_scan(*a, **kw),
            lambda *a: selective_scan.selective_scan_reference(*a, **kw),
            [u, delta, A, B, C, D, z, bias], dtype)
    else:
        check_against_reference(selective_scan.selective_scan,
                                selective_scan.selective_scan_reference, [u, delta, A, B, C], dtype)


def test_the_cpu_scan_loop_has_exact_gradients_and_equals_the_definition(monkeypatch):
    """The chunked loop with its hand-written backward (the non-CUDA path in auto mode): gradcheck
    in fp64 over 3 chunks + 2; the dispatcher's output, final state and gradients equal the
    step-by-step definition's."""
    monkeypatch.setattr(selective_scan._ScanLoop, "CHUNK", 4)
    g = torch.Generator().manual_seed(3)
    f64 = dict(dtype=torch.float64, generator=g)
    u, delta = torch.randn(2, 5, 14, **f64), torch.rand(2, 5, 14, **f64)
    A, B, C = -2 * torch.rand(5, 3, **f64), torch.randn(2, 3, 14, **f64), torch.randn(2, 3, 14, **f64)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan._ScanLoop.apply(*a)[0], inputs)
    assert dispatch.mode() == "auto"
    D, z, bias = torch.randn(5, generator=g), torch.randn(2, 5, 14, generator=g), torch.rand(5, generator=g)
    kw = dict(delta_softplus=True)
    check_against_reference(lambda *a: selective_scan.selective_scan(*a, **kw),
                            lambda *a: selective_scan.selective_scan_reference(*a, **kw),
                            [u.detach(), delta.detach(), A.detach(), B.detach(), C.detach(), D, z, bias],
                            torch.float32)
    _, last = selective_scan.selective_scan(u.float(), delta.float(), A.float(), B.float(), C.float(),
                                            return_last_state=True)
    _, last_ref = selective_scan.selective_scan_reference(u, delta, A, B, C, return_last_state=True)
    torch.testing.assert_close(last, last_ref.float())


def test_selective_scan_returns_the_final_state(triton_mode):
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, 11, generator=g), torch.rand(1, 4, 11, generator=g)
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(1, 3, 11, generator=g), torch.randn(1, 3, 11, generator=g)
    y, last = selective_scan.selective_scan(u, delta, A, B, C, return_last_state=True)
    y_ref, last_ref = selective_scan.selective_scan_reference(u, delta, A, B, C, return_last_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)


def test_dispatch_uses_references_on_cpu_and_when_forced():
    x = torch.randn(4, 8)
    assert dispatch.mode() == "auto" and not dispatch.use_triton(x)
    dispatch.set_mode("reference")
    try:
        assert not dispatch.use_triton(x)
    finally:
        dispatch.set_mode("auto")
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        dispatch.set_mode("fast")


def test_every_family_build_applies_model_kernels_as_the_dispatch_mode():
    from model import get_family
    from pretrain.core.config import load_config

    try:
        for mode in ("reference", "auto"):
            cfg = load_config(None, ["model.name=fractalformer", "model.num_layers=1", "model.hidden_size=32",
                                     "model.num_attention_heads=2", "model.num_query_groups=1",
                                     "model.ffn_hidden_size=64", "model.vocab_size=16",
                                     f"model.kernels={mode}"])
            dispatch.set_mode("triton")
            get_family("fractalformer").build(cfg.model, cfg.parallel)
            assert dispatch.mode() == mode
    finally:
        dispatch.set_mode("auto")


def _angles(seq: int, rot_dim: int) -> torch.Tensor:
    """megatron's RoPE angle table ``[s, 1, 1, rot_dim]``: cat((f, f))."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    half = torch.outer(torch.arange(seq).float(), inv_freq)
    return torch.cat((half, half), dim=-1)[:, None, None, :]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 12])  # 12 < head dim 16: the tail passes through
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_matches_megatron_unfused_path(interleaved, rot_dim, dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator().manual_seed(0)
    t = torch.randn(11, 3, 4, 16, generator=g).to(dtype).requires_grad_()
    freqs = _angles(11, rot_dim)
    ours = rotary.apply_rotary(t, freqs, interleaved=interleaved)
    theirs = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn(ours.shape, generator=g).to(dtype)
    torch.testing.assert_close(torch.autograd.grad(ours, t, grad)[0],
                               torch.autograd.grad(theirs, t, grad)[0])


def test_rotary_compiles_with_the_table_op_kept_out_of_the_fused_kernel():
    t = torch.randn(9, 2, 3, 8, requires_grad=True)
    freqs = _angles(9, 8)
    compiled = torch.compile(rotary.apply_rotary, fullgraph=True)
    torch.testing.assert_close(compiled(t, freqs), rotary.apply_rotary(t, freqs))


def _count_calls(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_mistral_runs_its_fusable_ops_through_the_dispatchers(session, monkeypatch):
    from helpers import build_model

    counts = {"norm": _count_calls(monkeypatch, rmsnorm, "rmsnorm_reference"),
              "swiglu": _count_calls(monkeypatch, swiglu, "swiglu_reference"),
              "rope": _count_calls(monkeypatch, rotary, "rotary_reference"),
              "loss": _count_calls(monkeypatch, cross_entropy, "cross_entropy_reference")}
    model = build_model(session)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        model(ids, ids)
    layers = session.model.num_layers
    assert {k: len(v) for k, v in counts.items()} == {
        "norm": 2 * layers + 1, "swiglu": layers, "rope": 2 * layers, "loss": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path is taken on CUDA only")
@pytest.mark.parametrize("family", ["mistral", "fim_mistral"])
def test_on_cuda_the_models_take_the_triton_kernels_and_match_the_references(session, monkeypatch,
                                                                            family):
    from helpers import build_model

    kernels = [("norm", rmsnorm._RMSNormTriton), ("swiglu", swiglu._SwiGLUTriton),
               ("rope", rotary._RotaryTriton), ("loss", cross_entropy._CrossEntropyTriton)]
    if family == "fim_mistral":
        kernels.append(("fim", fim_attention._FimAttentionTriton))
    fused = {name: _count_calls(monkeypatch, fn, "apply") for name, fn in kernels}
    session.model.name = family
    model = build_model(session).cuda()
    ids = torch.randint(0, 256, (2, 64), device="cuda")

    def loss_and_grads(mode):
        dispatch.set_mode(mode)
        model.zero_grad()
        loss = model(ids, ids).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    try:
        ref_loss, ref_grads = loss_and_grads("reference")
        assert not any(fused.values())
        loss, grads = loss_and_grads("auto")
    finally:
        dispatch.set_mode("auto")
    assert all(fused.values()), {k: len(v) for k, v in fused.items()}
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_bench_kernels_on_cpu_times_the_references_and_says_why(tmp_path):
    import json

    from helpers import run_cli

    proc = run_cli("-m", "pretrain", "bench", "kernels", "--out", str(tmp_path), "--repeats", "2",
                   "--ops", "rmsnorm", "rotary")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "Triton kernels need a GPU" in results["note"] and "Triton kernels need a GPU" in proc.stdout
    assert set(results["ops"]) == {"rmsnorm", "rotary"}
    for op in results["ops"].values():
        assert set(op["implementations"]) == {"torch eager", "torch.compile"}
        assert all(i["ms"] > 0 and i["gb_per_s"] > 0 for i in op["implementations"].values())
    assert "| rmsnorm |" in (tmp_path / "table.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with ~20 GB free")
def test_on_cuda_row_wise_kernels_address_past_2_to_the_31_elements(triton_mode):
    """Rows x columns past 2^31: offsets must be 64-bit (32-bit ones wrap and read other rows).
    The interpreter cannot show it without allocating as much on the host."""
    cols = 4096
    rows = 2**31 // cols + 16
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(cols, device="cuda", dtype=torch.bfloat16)
    tail = slice(rows - 32, rows)
    torch.testing.assert_close(rmsnorm.rmsnorm(x, w, 1e-5)[tail],
                               rmsnorm.rmsnorm_reference(x[tail], w, 1e-5), **TOL[torch.bfloat16])
    halves = x.view(rows // 2, 2 * cols)  # swiglu: [gate | up] rows of 2 x 4096
    torch.testing.assert_close(swiglu.swiglu(halves)[-16:], swiglu.swiglu_reference(halves[-16:]),
                               **TOL[torch.bfloat16])
    del halves
    t = x.view(-1, 2, 32, 128)  # rotary: [s, b, heads, dim], s = (2^31 + 16 x 4096) / 8192
    freqs = _angles(t.shape[0], 128).cuda()
    torch.testing.assert_close(rotary.apply_rotary(t, freqs)[-4:],
                               rotary.rotary_reference(t[-4:], freqs[-4:]), **TOL[torch.bfloat16])


def test_fim_tiles_past_the_kernels_largest_take_the_torch_path_with_a_warning(triton_mode, monkeypatch):
    from kernels.fim_geometry import FimGeometry
    from kernels.fim_reference import fim_attention_blocked as torch_path

    bf16, fp32 = torch.bfloat16, torch.float32
    assert fim_attention.launch_options(32, 128, bf16) == dict(num_warps=8, num_stages=3)
    assert fim_attention.launch_options(64, 128, bf16) == dict(num_warps=8, num_stages=1)
    assert fim_attention.launch_options(32, 64, fp32) == dict(num_warps=4, num_stages=3)
    assert fim_attention.launch_options(32, 128, fp32) == dict(num_warps=8, num_stages=3)
    assert fim_attention.launch_options(64, 128, fp32) is None
    assert fim_attention.launch_options(128, 128, bf16) is None
    kernel_calls = _count_calls(monkeypatch, fim_attention, "fim_attention_triton")
    geom = FimGeometry(128, 2, 1, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 256, 128, generator=g) for h in (2, 1, 1))
    with pytest.warns(UserWarning, match="leaf block 128 x head dim 128 in torch.float32 exceeds"):
        out = fim_attention.fim_attention(q, k, v, geom, ("local", "routed", "hierarchical"))
    assert not kernel_calls
    torch.testing.assert_close(out, torch_path(q, k, v, geom, ("local", "routed", "hierarchical")))
