"""FIM attention: blocked fast path vs the dense reference, causality, TP invariance, the model
family, and its CLI tools (bench attention, inspect-attention)."""
import json

import pytest
import torch

from kernels.fim_geometry import BRANCHES, FimGeometry, route_blocks
from kernels.fim_reference import fim_attention_blocked as fim_attention
from kernels.fim_reference import fim_attention_reference, fim_weights_reference
from model import get_family

from helpers import ROOT, build_model, losses_by_step, run_cli, torchrun, train_cmd


def qkv(n, heads=4, groups=2, d=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    return make(heads), make(groups), make(groups)


@pytest.mark.parametrize("block, branching, top_k, n", [
    (4, 2, 2, 37),      # N not a multiple of B, deep hierarchy
    (8, 4, 1, 50),
    (4, 3, 3, 64),      # B * b^levels overshoots N
    (5, 2, 2, 9),       # two blocks only
    (16, 2, 2, 16),     # one block: local only
])
@pytest.mark.parametrize("branches", [BRANCHES, ("local", "hierarchical"), ("local", "routed")],
                         ids=["all", "local+hier", "local+routed"])
def test_fast_path_equals_dense_reference(block, branching, top_k, n, branches):
    geom = FimGeometry(block, branching, FimGeometry.auto_levels(n, block, branching), top_k)
    q, k, v = qkv(n)
    fast = fim_attention(q, k, v, geom, branches)
    ref = fim_attention_reference(q, k, v, geom, branches)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    weights = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                    torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_reference_sees_the_whole_past_once_at_decreasing_resolution():
    """Local + summaries tile every earlier token exactly once (routed blocks come on top), and a
    query sees at most B + (b - 1) * levels + top_k * B keys."""
    n, geom = 45, FimGeometry(4, 2, FimGeometry.auto_levels(45, 4, 2), 2)
    q, k, _ = qkv(n, heads=2, groups=2)
    _, units, branch = fim_weights_reference(q.detach(), k.detach(), geom)
    for i in range(n):
        covered = torch.zeros(n, dtype=torch.long)
        covered[: i + 1] += (branch[0, 0, i, :n] == 1).long()[: i + 1]
        for j, (_, _, start, end) in enumerate(units):
            if branch[0, 0, i, n + j] == 3:
                covered[start:end] += 1
        assert covered[: i + 1].tolist() == [1] * (i + 1), i
        assert int((branch[0, 0, i] > 0).sum()) <= 4 + 1 * geom.levels + 2 * 4


def test_routing_picks_the_best_scoring_earlier_blocks():
    """A key block aligned with the preceding block's mean query wins the routing."""
    B, n, d = 4, 32, 8
    q = torch.zeros(1, 1, n, d)
    k = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(0)) * 0.01
    q[0, 0, 20:24, 0] = 1.0          # block 5's queries point along e0
    k[0, 0, 8:12, 0] = 5.0           # block 2's keys too
    idx, valid = route_blocks(q, k, B, top_k=1)
    assert valid[6].item() and idx[0, 0, 6, 0].item() == 2   # block 6 routes with block 5's query
    assert not valid[0].any() and not valid[1].any()          # no earlier candidate


@pytest.mark.parametrize("block, branching, top_k", [(4, 2, 2), (6, 3, 1)])
def test_causality_changing_a_token_never_changes_the_past(block, branching, top_k):
    n = 40
    geom = FimGeometry(block, branching, FimGeometry.auto_levels(n, block, branching), top_k)
    q, k, v = (t.detach() for t in qkv(n))
    base = fim_attention(q, k, v, geom)
    for j in range(1, n):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, j] += 3.0
        k2[:, :, j] -= 2.0
        v2[:, :, j] += 1.0
        out = fim_attention(q2, k2, v2, geom)
        torch.testing.assert_close(out[:, :, :j], base[:, :, :j], atol=0, rtol=0, msg=f"token {j}")
        assert not torch.allclose(out[:, :, j], base[:, :, j])


@pytest.fixture
def fim_session(session):
    session.model.name = "fim_mistral"
    session.model.fim.block_size = 8
    return session


def test_model_is_causal_and_counts_match_closed_forms(fim_session):
    model = build_model(fim_session).eval()
    family = get_family("fim_mistral")
    assert sum(p.numel() for p in model.parameters()) == family.parameter_count(fim_session.model)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 37] = (changed[0, 37] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :37], b[:, :37], atol=0, rtol=0)
    assert not torch.allclose(a[:, 37], b[:, 37])
    # FLOPs: the baseline's matmuls + 12 h x (B + k B + levels (b - 1)) per layer
    base = get_family("mistral").training_flops_per_token(fim_session.model)
    mistral_attention = 12 * 2 * 64 * 32  # 2 layers, hidden 64, window 32
    fim_keys = 8 + 2 * 8 + 3 * 1          # B=8, top-2 routed blocks, 3 levels over 64 tokens
    assert family.training_flops_per_token(fim_session.model) == base - mistral_attention + 12 * 2 * 64 * fim_keys


def test_per_layer_settings_reach_each_layer(fim_session):
    from model.fim_mistral.config import FimLayerConfig

    fim_session.model.fim.layers = [FimLayerConfig(top_k=0, branches="local"),
                                    FimLayerConfig(block_size=16, branching=4)]
    model = build_model(fim_session)
    first, second = (c.geometry for c in model.core_attentions())
    assert model.core_attentions()[0].branches == ("local",) and first.top_k == 0
    assert (second.block, second.branching, second.levels, second.top_k) == (16, 4, 1, 2)


@pytest.mark.integration
def test_fim_at_tp2_equals_tp1(dataset, tmp_path):
    """Two gloo ranks split the heads; FIM's routing and summaries are per head."""
    extra = {"model.name": "fim_mistral", "model.fim.block_size": 8, "train.steps": 4}
    one = run_cli(*train_cmd(dataset, tmp_path / "one", **extra))
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(2, train_cmd(dataset, tmp_path / "two", **extra, **{"parallel.tp": 2}))
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    expected, losses = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step


def test_mask_documents_is_refused_for_fim():
    from pretrain.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mask_documents"):
        load_config(ROOT / "configs" / "fim_mistral_tiny.yaml", ["data.mask_documents=true"])


@pytest.mark.integration
def test_bench_attention_writes_the_documented_shape(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("-m", "pretrain", "bench", "attention", "--out", str(out), "--min-n", "128",
                     "--max-n", "512", "--fit-range", "128", "512", "--repeats", "1", "--sweeps", "2",
                     "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--block", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"dense", "sliding_window", "fim"} and results["sweeps"] == 2
    for entry in results["methods"].values():
        low, high = entry["exponent_ci"]          # 6 samples over 3 sizes
        assert isinstance(entry["exponent"], float) and low <= entry["exponent"] <= high
        assert [p["n"] for p in entry["points"]] == [128, 256, 512]
        assert all(p["fwd_bwd_ms"] > 0 and p["peak_mb"] >= 0 and len(p["sweeps_ms"]) == 2
                   for p in entry["points"])
    assert (out / "attention_scaling.png").stat().st_size > 10_000


@pytest.mark.integration
def test_inspect_attention_plots_a_trained_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    trained = run_cli(*train_cmd(dataset, run_dir, **{"model.name": "fim_mistral",
                                                      "model.fim.block_size": 8}))
    assert trained.returncode == 0, trained.stderr[-2000:]
    png = tmp_path / "attn.png"
    result = run_cli("-m", "pretrain", "inspect-attention", "--ckpt", str(run_dir), "--text",
                     "To be, or not to be, that is the question: whether 'tis nobler", "--out", str(png))
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.stat().st_size > 10_000
    summary = json.loads(png.with_suffix(".json").read_text())
    assert len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert sum(layer["mass"].values()) == pytest.approx(1.0, abs=1e-6)
        assert layer["routed_blocks_per_group"] is not None
    baseline = run_cli("-m", "pretrain", "inspect-attention", "--ckpt", str(run_dir), "--text", "a",
                       "--out", str(png))
    assert baseline.returncode == 2 and "at least 2 tokens" in baseline.stderr
