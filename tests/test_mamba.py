"""Our Mamba block against transformers' MambaMixer (its torch path) and against itself run
recurrently."""
import torch

from kernels import dispatch
from model.fractal_mamba.mamba import MambaBlock


def _pair(hidden=32, state=8, conv=4, seed=0):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(seed)
    config = MambaConfig(hidden_size=hidden, state_size=state, expand=2, conv_kernel=conv,
                         num_hidden_layers=1, use_bias=False, use_conv_bias=True)
    theirs = MambaMixer(config, layer_idx=0).eval()
    ours = MambaBlock(hidden, state, 2, conv, dt_rank=int(config.time_step_rank))
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), theirs


def test_mamba_block_equals_transformers_mamba_mixer():
    ours, theirs = _pair()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_recurrent_steps_equal_the_parallel_forward():
    ours, _ = _pair(seed=1)
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        parallel = ours(x)
        state = ours.initial_state(3)
        steps = []
        for t in range(x.shape[1]):
            out, state = ours.step(x[:, t], state)
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), parallel, atol=1e-5, rtol=1e-5)


def test_mamba_block_through_the_triton_scan_matches_the_reference_path():
    ours, _ = _pair(hidden=16, state=4, seed=2)
    x = torch.randn(2, 11, 16, requires_grad=True)
    reference = ours(x)
    grads_ref = torch.autograd.grad(reference.sum(), [x, *ours.parameters()])
    dispatch.set_mode("triton")  # Triton's interpreter on CPU (conftest sets TRITON_INTERPRET)
    try:
        fused = ours(x)
        grads = torch.autograd.grad(fused.sum(), [x, *ours.parameters()])
    finally:
        dispatch.set_mode("auto")
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
