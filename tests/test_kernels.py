"""Kernels against their references (and the references against megatron's own formulas)."""
import pytest
import torch

from kernels import rotary


def _angles(seq: int, rot_dim: int) -> torch.Tensor:
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


def test_mistral_routes_rope_through_our_dispatcher(session, monkeypatch):
    from conftest import build_model

    calls = []
    real = rotary.rotary_reference
    monkeypatch.setattr(rotary, "rotary_reference", lambda *a: calls.append(1) or real(*a))
    model = build_model(session)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        model(ids, None)
    assert len(calls) == 2 * session.model.num_layers  # q and k in every layer
