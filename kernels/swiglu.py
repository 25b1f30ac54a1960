"""SwiGLU on megatron's fused fc1 output: ``x = [gate | up]`` on the last dimension ->
``silu(gate) * up``. One pass forward, one backward (eager torch: chunk, silu, mul, and as many
intermediates kept for backward)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _swiglu_fwd(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)   # rows x 2 x n_cols passes 2^31 at real shapes
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, x_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)   # rows x 2 x n_cols passes 2^31 at real shapes
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * gate * sig
    tl.store(dx_ptr + row * 2 * n_cols + cols, dgate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + row * 2 * n_cols + n_cols + cols, dup.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, n_cols: int, block: int) -> tuple[int, int]:
    return rows, triton.cdiv(n_cols, block)


class _SwiGLUTriton(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, n_cols = x2.shape[0], x2.shape[1] // 2
        y = torch.empty(rows, n_cols, device=x.device, dtype=x.dtype)
        block = min(_SwiGLUTriton.BLOCK, triton.next_power_of_2(n_cols))
        _swiglu_fwd[_grid(rows, n_cols, block)](x2, y, n_cols, BLOCK=block)
        ctx.save_for_backward(x2)
        ctx.shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        rows, n_cols = x2.shape[0], x2.shape[1] // 2
        dx = torch.empty_like(x2)
        block = min(_SwiGLUTriton.BLOCK, triton.next_power_of_2(n_cols))
        _swiglu_bwd[_grid(rows, n_cols, block)](dy.reshape(rows, n_cols).contiguous(), x2, dx,
                                                n_cols, BLOCK=block)
        return dx.view(ctx.shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension ([gate | up]), got {x.shape[-1]}")
    if dispatch.use_triton(x):
        return _SwiGLUTriton.apply(x)
    return swiglu_reference(x)
