import pytest
import torch

from model import get_family
from model.attention import causal_attention

from helpers import build_model as build


def test_closed_form_parameter_count_matches_the_model(session):
    model = build(session)
    assert sum(p.numel() for p in model.parameters()) == get_family("mistral").parameter_count(session.model)


@pytest.mark.parametrize("window", [0, 5, 64])
@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_path_matches_reference(window, heads, groups):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 17, 8, generator=g, requires_grad=True)
    k = torch.randn(2, groups, 17, 8, generator=g, requires_grad=True)
    v = torch.randn(2, groups, 17, 8, generator=g, requires_grad=True)
    blocked = torch.zeros(2, 1, 17, 17, dtype=torch.bool)
    blocked[1, :, 9:, :9] = True  # second row: two documents
    for mask in (None, blocked):
        fast = causal_attention(q, k, v, window, "sdpa", mask)
        ref = causal_attention(q, k, v, window, "reference", mask)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        gf = torch.autograd.grad(fast.sum(), (q, k, v))
        gr = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def logits(model, ids, segment_ids=None):
    with torch.no_grad():
        return model(ids, None, segment_ids)


def test_causality_and_sliding_window(session):
    model = build(session).eval()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    base = logits(model, ids)
    assert base.shape[:2] == (1, 64)
    j = 40
    changed = ids.clone()
    changed[0, j] = (changed[0, j] + 1) % 256
    out = logits(model, changed)
    torch.testing.assert_close(out[:, :j], base[:, :j], atol=0, rtol=0)  # the past never sees j
    assert not torch.allclose(out[:, j], base[:, j])


def test_document_mask_keeps_packed_documents_apart(session):
    model = build(session).eval()
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    segments = torch.zeros(1, 48, dtype=torch.long)
    segments[0, 20:] = 1
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 256  # inside the first document
    masked_a, masked_b = logits(model, ids, segments), logits(model, changed, segments)
    torch.testing.assert_close(masked_a[:, 20:], masked_b[:, 20:], atol=0, rtol=0)
    open_a, open_b = logits(model, ids), logits(model, changed)
    assert not torch.allclose(open_a[:, 20:], open_b[:, 20:])


def test_training_flops_formula(session):
    from pretrain.core.config import load_config

    from helpers import ROOT

    cfg = load_config(ROOT / "configs" / "mistral_7b.yaml")
    n = get_family("mistral").parameter_count(cfg.model)
    expected = 6 * (n - 32000 * 4096) + 12 * 32 * 4096 * 4096
    assert get_family("mistral").training_flops_per_token(cfg.model) == expected
    cfg.model.sliding_window = 1024  # the window bounds the attended context
    assert get_family("mistral").training_flops_per_token(cfg.model) == expected - 12 * 32 * 4096 * 3072


def test_activation_recompute_reruns_layers_and_keeps_gradients(session):
    """parallel.recompute: each layer runs again in backward (megatron's checkpointing, through
    the CPU RNG shim); the gradients are those of the plain model."""
    plain = build(session, seed=3)
    session.parallel.recompute = True
    recomputed = build(session, seed=3)
    calls = []
    for layer in recomputed.gpt.decoder.layers:
        layer.mlp.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    for model in (plain, recomputed):
        model(ids, ids.roll(-1, 1)).mean().backward()
    assert len(calls) == 2 * session.model.num_layers  # forward, then again in backward
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6, msg=name)
