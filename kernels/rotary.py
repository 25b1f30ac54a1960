"""Rotary position embedding, applied the way megatron-core's unfused path does (``[s, b, n, d]``,
freqs ``[s, 1, 1, rot_dim]``, halves rotated, dims past ``rot_dim`` passed through).

Why our own: megatron computes ``cos(freqs)`` and ``sin(freqs)`` inside every layer, and under
torch.compile inductor fuses them into the elementwise kernel that applies them, so every element
of q and k pays a sine and a cosine (about a third of a layer's elementwise time on CPU). Here the
tables come from an opaque op, so they are computed once per call at table size and read from
memory. On CUDA a Triton kernel rotates q or k in one pass, computing the angles' cos/sin per
position. Megatron reaches this module through its own extension point for a fused RoPE
(``apply_rope_fusion``, see ``install``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch


@torch.library.custom_op("fractal::rope_cos_sin", mutates_args=())
def rope_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the angle table; opaque to inductor so it is never fused into a consumer."""
    return freqs.cos(), freqs.sin()


@rope_cos_sin.register_fake
def _(freqs):
    return torch.empty_like(freqs), torch.empty_like(freqs)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_reference(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``t [s, b, n, d]``, ``freqs [s, 1, 1, rot_dim]`` (angles) -> t rotated on its first
    ``rot_dim`` channels: ``t * cos + rotate_half(t) * sin``."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = rope_cos_sin(freqs)
    out = t_rot * cos.to(t.dtype) + _rotate_half(t_rot, interleaved) * sin.to(t.dtype)
    return out if t_pass.shape[-1] == 0 else torch.cat((out, t_pass), dim=-1)


@triton.jit
def _rotary_kernel(t_ptr, f_ptr, out_ptr, positions_per_row, n_heads, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per (position, batch) row of ``[s, b, heads, 2 * HALF]``. Forward:
    ``[x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]``; backward applies the transpose."""
    row = tl.program_id(0)
    pos = row // positions_per_row
    d = tl.arange(0, HALF)
    f1 = tl.load(f_ptr + pos * 2 * HALF + d).to(tl.float32)
    f2 = tl.load(f_ptr + pos * 2 * HALF + HALF + d).to(tl.float32)
    c1, s1, c2, s2 = tl.cos(f1), tl.sin(f1), tl.cos(f2), tl.sin(f2)
    base = row.to(tl.int64) * n_heads * 2 * HALF   # 64-bit: s * b * heads * dim may pass 2^31
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        offs = h[:, None] * 2 * HALF + d[None, :]
        mask = h[:, None] < n_heads
        x1 = tl.load(t_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(t_ptr + base + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1[None, :] + x2 * s2[None, :]
            y2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            y1 = x1 * c1[None, :] - x2 * s1[None, :]
            y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(out_ptr + base + offs, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + offs + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    t = t.contiguous()
    s, b, heads, dim = t.shape
    out = torch.empty_like(t)
    angles = freqs.reshape(freqs.shape[0], dim).float().contiguous()
    _rotary_kernel[(s * b,)](t, angles, out, b, heads, HALF=dim // 2,
                             BLOCK_H=min(16, triton.next_power_of_2(heads)), BACKWARD=backward)
    return out


class _RotaryTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _rotate(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return _rotate(dy, freqs, backward=True), None


def _kernel_fits(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> bool:
    """The kernel covers the Mistral case: every channel rotated, halves (not interleaved),
    one angle row per position, a power-of-two head dim."""
    dim = t.shape[-1]
    return (t.dim() == 4 and not interleaved and freqs.shape[-1] == dim
            and freqs.shape[0] == t.shape[0] and freqs[0].numel() == dim
            and dim >= 2 and dim & (dim - 1) == 0)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                 interleaved: bool = False) -> torch.Tensor:
    """Dispatcher with TransformerEngine's ``fused_apply_rotary_pos_emb`` signature, the one
    megatron calls when ``apply_rope_fusion`` is set (``transpose_output_memory`` is a TE layout
    hint with no effect on values)."""
    if dispatch.use_triton(t) and _kernel_fits(t, freqs, interleaved):
        return _RotaryTriton.apply(t, freqs)
    return rotary_reference(t, freqs, interleaved)


def install() -> None:
    """Make megatron's ``apply_rope_fusion=True`` path call ``apply_rotary``, unless
    TransformerEngine already provides its fused kernel there (kept: it is the faster one)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary
