"""FIM block-sparse attention as one flash-style Triton kernel (forward and backward).

Same attention as the blocked torch path of ``kernels/fim_reference.py`` (the geometry is defined
in ``kernels/fim_geometry.py``): a query in leaf block c attends, in one softmax, to its own block
causally, to the top-k routed earlier blocks of its key/value group, and to the mean-pooled
summaries of its earlier siblings at every level (each with its +log(span) bias). The torch path gathers those keys per block and
calls SDPA with a bias mask; here one program per (batch, query head, leaf block) streams the
key sets through an online softmax, so nothing is gathered or materialized. Routing and pooling
stay in torch (cheap: per block, not per token); their outputs are the kernel's inputs, and the
pooled summaries receive gradients like any key, which autograd carries back to the tokens.

Backward recomputes the probabilities from the saved log-sum-exp. Keys of a block are read by
its own queries and by every later block that routes to it, and a summary by many blocks, so
their gradients are accumulated with atomic adds into fp32 buffers.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from . import dispatch
from .fim_geometry import pooled_levels, route_blocks, sibling_slots
from .fim_reference import fim_attention_blocked


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """fp32 accumulation; 16-bit operands stay 16-bit (tensor cores), fp32 ones are exact."""
    if DOT == tl.float32:
        return tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee")
    return tl.dot(a.to(DOT), b.to(DOT))


@triton.jit
def _online_softmax(m_i, l_i, acc, s, v, DOT: tl.constexpr):
    """Fold one key set's scores ``s`` and values ``v`` into the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p, v, DOT)


@triton.jit
def _routed_keys(route_ptr, route_ok_ptr, bg, c, r, n_blocks, top_k, block, dim, cols, d):
    """Offsets (in the program's key/value group) of routed block ``r`` of leaf block ``c``, and
    whether the slot is in use (as a block: the interpreter masks with blocks, not scalars)."""
    ok = (cols * 0 + tl.load(route_ok_ptr + c * top_k + r).to(tl.int32)) != 0
    u = tl.load(route_ptr + (bg * n_blocks + c) * top_k + r).to(tl.int32)
    return (u * block + cols[:, None]) * dim + d[None, :], ok


@triton.jit
def _summary_keys(slot_ptr, slot_ok_ptr, bias_ptr, c, n_slots, dim, d, d_ok,
                  BLOCK_S: tl.constexpr):
    """Offsets (in the program's group) of the pooled keys of leaf block ``c``'s earlier
    siblings (all levels), which slots are in use, and each slot's log-span bias."""
    sl = tl.arange(0, BLOCK_S)
    sl_in = sl < n_slots
    slot_ok = tl.load(slot_ok_ptr + c * n_slots + sl, mask=sl_in, other=0) != 0
    unit = tl.load(slot_ptr + c * n_slots + sl, mask=sl_in, other=0).to(tl.int32)
    bias = tl.load(bias_ptr + sl, mask=sl_in, other=0.0)
    offs = unit[:, None] * dim + d[None, :]
    return offs, slot_ok[:, None] & d_ok[None, :], slot_ok, bias


@triton.jit
def _fim_fwd(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, route_ptr, route_ok_ptr, slot_ptr, slot_ok_ptr,
             bias_ptr, o_ptr, lse_ptr, n_heads, rep, n_pos, n_blocks, n_units, block, dim,
             top_k, n_slots, scale,
             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
             DOT: tl.constexpr):
    bh = tl.program_id(0)                       # (batch, query head)
    c = tl.program_id(1)                        # leaf block
    bg = (bh // n_heads) * (n_heads // rep) + (bh % n_heads) // rep   # (batch, kv group)
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_B)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    row_ok = rows < block
    # 64-bit scalar bases for this program's head and group, 32-bit offsets within them (tiles
    # of 64-bit offsets cost registers; the backward spilled with them)
    q_base, kv_base, pooled_base = (bh.to(tl.int64) * n_pos * dim, bg.to(tl.int64) * n_pos * dim,
                                    bg.to(tl.int64) * n_units * dim)
    q_ptr, o_ptr, k_ptr, v_ptr = q_ptr + q_base, o_ptr + q_base, k_ptr + kv_base, v_ptr + kv_base
    pk_ptr, pv_ptr = pk_ptr + pooled_base, pv_ptr + pooled_base
    q_offs = (c * block + rows[:, None]) * dim + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    key_ok = (cols < block)[:, None] & d_ok[None, :]
    m_i = tl.full([BLOCK_B], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)

    # 1. local: the block's own keys, causally
    offs = (c * block + cols[:, None]) * dim + d[None, :]
    s = _dot(q, tl.trans(tl.load(k_ptr + offs, mask=key_ok, other=0.0)), DOT) * scale
    s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < block), s, -float("inf"))
    m_i, l_i, acc = _online_softmax(m_i, l_i, acc, s,
                                    tl.load(v_ptr + offs, mask=key_ok, other=0.0), DOT)
    # 2. routed: whole earlier blocks chosen for this (batch, group, block)
    for r in range(0, top_k):
        offs, ok = _routed_keys(route_ptr, route_ok_ptr, bg, c, r, n_blocks, top_k, block, dim,
                                cols, d)
        mask = key_ok & ok[:, None]
        s = _dot(q, tl.trans(tl.load(k_ptr + offs, mask=mask, other=0.0)), DOT) * scale
        s = tl.where((cols[None, :] < block) & ok[None, :], s, -float("inf"))
        m_i, l_i, acc = _online_softmax(m_i, l_i, acc, s,
                                        tl.load(v_ptr + offs, mask=mask, other=0.0), DOT)
    # 3. summaries of earlier siblings, all levels at once, each with its log-span bias
    # (new names: a compiled `if` may not give a variable another shape than it had before)
    if n_slots > 0:
        s_offs, s_mask, slot_ok, bias = _summary_keys(slot_ptr, slot_ok_ptr, bias_ptr, c, n_slots,
                                                      dim, d, d_ok, BLOCK_S)
        s_sum = _dot(q, tl.trans(tl.load(pk_ptr + s_offs, mask=s_mask, other=0.0)), DOT) * scale
        s_sum = tl.where(slot_ok[None, :], s_sum + bias[None, :], -float("inf"))
        m_i, l_i, acc = _online_softmax(m_i, l_i, acc, s_sum,
                                        tl.load(pv_ptr + s_offs, mask=s_mask, other=0.0), DOT)

    tl.store(o_ptr + q_offs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * n_pos + c * block + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _key_set_bwd(q, do, lse, delta, k_ptrs, v_ptrs, dk_ptrs, dv_ptrs, kmask, valid, bias, scale,
                 DOT: tl.constexpr):
    """Gradient contributions of one key set: returns dq's share; adds into dk, dv."""
    k = tl.load(k_ptrs, mask=kmask, other=0.0)
    v = tl.load(v_ptrs, mask=kmask, other=0.0)
    s = _dot(q, tl.trans(k), DOT) * scale + bias
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    dv = _dot(tl.trans(p), do, DOT)
    dp = _dot(do, tl.trans(v), DOT)
    ds = p * (dp - delta[:, None])
    dk = _dot(tl.trans(ds), q, DOT) * scale
    tl.atomic_add(dv_ptrs, dv, mask=kmask)
    tl.atomic_add(dk_ptrs, dk, mask=kmask)
    return _dot(ds, k, DOT) * scale


@triton.jit
def _fim_bwd(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, route_ptr, route_ok_ptr, slot_ptr, slot_ok_ptr,
             bias_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, dpk_ptr, dpv_ptr,
             n_heads, rep, n_pos, n_blocks, n_units, block, dim, top_k, n_slots, scale,
             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
             DOT: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    bg = (bh // n_heads) * (n_heads // rep) + (bh % n_heads) // rep
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_B)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    row_ok = rows < block
    q_base, kv_base, pooled_base = (bh.to(tl.int64) * n_pos * dim, bg.to(tl.int64) * n_pos * dim,
                                    bg.to(tl.int64) * n_units * dim)   # as in the forward
    q_ptr, do_ptr, dq_ptr = q_ptr + q_base, do_ptr + q_base, dq_ptr + q_base
    k_ptr, v_ptr, dk_ptr, dv_ptr = k_ptr + kv_base, v_ptr + kv_base, dk_ptr + kv_base, dv_ptr + kv_base
    pk_ptr, pv_ptr = pk_ptr + pooled_base, pv_ptr + pooled_base
    dpk_ptr, dpv_ptr = dpk_ptr + pooled_base, dpv_ptr + pooled_base
    q_offs = (c * block + rows[:, None]) * dim + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_offs, mask=q_mask, other=0.0)
    row_offs = bh.to(tl.int64) * n_pos + c * block + rows
    lse = tl.load(lse_ptr + row_offs, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + row_offs, mask=row_ok, other=0.0)
    key_ok = (cols < block)[:, None] & d_ok[None, :]
    zero_bias = tl.zeros([BLOCK_B, BLOCK_B], tl.float32)

    offs = (c * block + cols[:, None]) * dim + d[None, :]
    valid = (cols[None, :] <= rows[:, None]) & (cols[None, :] < block) & row_ok[:, None]
    dq = _key_set_bwd(q, do, lse, delta, k_ptr + offs, v_ptr + offs, dk_ptr + offs, dv_ptr + offs,
                      key_ok, valid, zero_bias, scale, DOT)
    for r in range(0, top_k):
        offs, ok = _routed_keys(route_ptr, route_ok_ptr, bg, c, r, n_blocks, top_k, block, dim,
                                cols, d)
        valid = (cols[None, :] < block) & row_ok[:, None] & ok[None, :]
        dq += _key_set_bwd(q, do, lse, delta, k_ptr + offs, v_ptr + offs, dk_ptr + offs,
                           dv_ptr + offs, key_ok & ok[:, None], valid, zero_bias, scale, DOT)
    if n_slots > 0:
        s_offs, s_mask, slot_ok, bias = _summary_keys(slot_ptr, slot_ok_ptr, bias_ptr, c, n_slots,
                                                      dim, d, d_ok, BLOCK_S)
        dq += _key_set_bwd(q, do, lse, delta, pk_ptr + s_offs, pv_ptr + s_offs, dpk_ptr + s_offs,
                           dpv_ptr + s_offs, s_mask, slot_ok[None, :] & row_ok[:, None],
                           tl.zeros([BLOCK_B, BLOCK_S], tl.float32) + bias[None, :], scale, DOT)
    tl.store(dq_ptr + q_offs, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def _dot_dtype(dtype: torch.dtype):
    """Operand type of the kernel's matmuls. Triton's interpreter gets bf16 dots wrong (see
    FINDINGS.md), so there bf16 is multiplied in fp32."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1":
        return tl.bfloat16
    return tl.float32


def _tile(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


MAX_TILE = {2: 64 * 128, 4: 32 * 128}  # leaf block x head dim (padded), by element size


def launch_options(block: int, dim: int, dtype: torch.dtype) -> dict | None:
    """Warps and pipeline stages for a (leaf block x head dim) tile; None past ``MAX_TILE``.

    From ptxas's registers and Triton's shared memory per kernel (`check-kernels`, sm_80/sm_90):
    bf16 32 x 128 with 4 warps spills 660 B per thread in the backward (4 B with 8); 64 x 128
    and 128 x 64 need 8 warps and one stage (3 stages: 131 KB of shared memory, over sm_86/89's
    99 KB; 1 stage: 82-98 KB, 200 B spilled at sm_90, 2.3 KB at sm_80); 128 x 128 spills 1.5 KB
    and needs 164 KB. fp32 tiles cost twice the registers: 64 x 128 spilled ~100 KB."""
    tile = _tile(block) * _tile(dim)
    if tile > MAX_TILE[4 if dtype == torch.float32 else 2]:
        return None
    if tile > 4096:
        return dict(num_warps=8, num_stages=1)
    return dict(num_warps=8 if _tile(dim) >= 128 else 4, num_stages=3)


class _FimAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pooled_k, pooled_v, route, route_ok, slots, slots_ok, bias, block):
        bsz, heads, n_pos, dim = q.shape
        groups, n_units = k.shape[1], pooled_k.shape[2]
        n_blocks, top_k, n_slots = n_pos // block, route.shape[-1], slots.shape[-1]
        if n_pos * dim >= 2**31:
            raise ValueError(f"FIM kernel: {n_pos} positions x head dim {dim} per head exceed the "
                             "kernel's 32-bit offsets")
        q, k, v, pooled_k, pooled_v = (t.contiguous() for t in (q, k, v, pooled_k, pooled_v))
        out = torch.empty_like(q)
        lse = torch.empty(bsz, heads, n_pos, device=q.device, dtype=torch.float32)
        meta = (heads, heads // groups, n_pos, n_blocks, n_units, block, dim, top_k, n_slots,
                1.0 / math.sqrt(dim))
        consts = dict(BLOCK_B=_tile(block), BLOCK_D=_tile(dim),
                      BLOCK_S=_tile(max(n_slots, 1)), DOT=_dot_dtype(q.dtype),
                      **launch_options(block, dim, q.dtype))
        _fim_fwd[(bsz * heads, n_blocks)](q, k, v, pooled_k, pooled_v, route, route_ok, slots,
                                          slots_ok, bias, out, lse, *meta, **consts)
        ctx.save_for_backward(q, k, v, pooled_k, pooled_v, route, route_ok, slots, slots_ok, bias,
                              out, lse)
        ctx.meta, ctx.consts = meta, consts
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pooled_k, pooled_v, route, route_ok, slots, slots_ok, bias, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in (k, v))
        dpk, dpv = (torch.zeros(t.shape, device=t.device, dtype=torch.float32)
                    for t in (pooled_k, pooled_v))
        _fim_bwd[(q.shape[0] * q.shape[1], ctx.meta[3])](
            q, k, v, pooled_k, pooled_v, route, route_ok, slots, slots_ok, bias, dout, lse, delta,
            dq, dk, dv, dpk, dpv, *ctx.meta, **ctx.consts)
        return (dq, dk.to(k.dtype), dv.to(v.dtype), dpk.to(pooled_k.dtype), dpv.to(pooled_v.dtype),
                None, None, None, None, None, None)


def fim_attention_triton(q, k, v, geom, branches) -> torch.Tensor:
    """q ``[b, h, N, d]``, k/v ``[b, g, N, d]`` -> ``[b, h, N, d]`` through the Triton kernel."""
    import torch.nn.functional as F

    bsz, heads, n, dim = q.shape
    groups, block = k.shape[1], geom.block
    nb = -(-n // block)
    pad = nb * block - n
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    device = q.device
    if "routed" in branches and geom.top_k > 0 and nb > 1:
        route, route_ok = route_blocks(q, k, block, geom.top_k)
    else:
        route = torch.zeros(bsz, groups, nb, 0, dtype=torch.long, device=device)
        route_ok = torch.zeros(nb, 0, dtype=torch.bool, device=device)
    if "hierarchical" in branches and geom.levels > 0:
        slots, slots_ok, level = sibling_slots(nb, geom.branching, geom.levels, device)
        pooled_k = pooled_levels(kp, block, geom.branching, geom.levels)
        pooled_v = pooled_levels(vp, block, geom.branching, geom.levels)
        bias = (math.log(block) + level * math.log(geom.branching)).float()
    else:
        slots = torch.zeros(nb, 0, dtype=torch.long, device=device)
        slots_ok = torch.zeros(nb, 0, dtype=torch.bool, device=device)
        pooled_k = pooled_v = kp.new_zeros(bsz, groups, 1, dim)
        bias = torch.zeros(0, device=device)
    out = _FimAttentionTriton.apply(
        qp, kp, vp, pooled_k, pooled_v, route.contiguous(), route_ok.to(torch.int8).contiguous(),
        slots.contiguous(), slots_ok.to(torch.int8).contiguous(), bias.contiguous(), block)
    return out[:, :, :n]


def fim_attention(q, k, v, geom, branches) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the blocked torch path (gather + SDPA) elsewhere
    and for tiles larger than the kernel handles (see ``launch_options``)."""
    if dispatch.use_triton(q, k, v):
        if launch_options(geom.block, q.shape[-1], q.dtype) is not None:
            return fim_attention_triton(q, k, v, geom, branches)
        _warn_tile_once(geom.block, q.shape[-1], q.dtype)
    return fim_attention_blocked(q, k, v, geom, branches)


@functools.lru_cache(maxsize=None)
def _warn_tile_once(block: int, dim: int, dtype: torch.dtype) -> None:
    warnings.warn(f"FIM attention: leaf block {block} x head dim {dim} in {dtype} exceeds the "
                  "Triton kernel's largest tile (64 x 128 in 16-bit, 32 x 128 in fp32): using the "
                  "torch path (gather + SDPA)", stacklevel=3)
