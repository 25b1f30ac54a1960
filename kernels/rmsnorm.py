"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * w`` over the last dimension, statistics in fp32.

The Triton kernels read each row once forward (saving only the fp32 reciprocal RMS per row) and
once backward, where eager torch makes several passes and keeps fp32 copies of the activations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from . import dispatch


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)   # rows x n_cols may pass 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                 rows_per_program, BLOCK: tl.constexpr):
    """Each program takes a contiguous run of rows and accumulates its share of dw in fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (start + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            g = dy * w
            dx = rstd * (g - x_hat * tl.sum(g * x_hat, axis=0) / n_cols)
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * x_hat
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _warps(block: int) -> int:
    """A row per program: more warps for longer rows (Triton's layer-norm tutorial's rule); at
    hidden 4096, 8 warps: 64 registers per thread in the fp32 backward, not 166 (check-kernels)."""
    return min(max(block // 256, 1), 8)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        _rmsnorm_fwd[(rows,)](x2, weight, y, rstd, cols, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        programs = min(rows, 512)
        per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, per_program)
        dw_partial = torch.empty(programs, cols, device=x2.device, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, rows, cols, per_program,
                                  BLOCK=block, num_warps=_warps(block))
        return dx.view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if dispatch.use_triton(x, weight):
        return _RMSNormTriton.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """Drop-in for megatron's norm in a layer spec (same constructor, parameter named ``weight``,
    so checkpoints match ``torch.nn.RMSNorm``'s)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Megatron all-reduces the gradients of parameters marked so under sequence parallelism.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)
