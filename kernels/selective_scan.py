"""Mamba's causal selective scan, mamba-ssm's ``selective_scan_fn`` semantics:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = sum_n C_t[n] * h_t[n]  (+ D * u_t)  (* silu(z_t))

``u``, ``delta``, ``z`` are ``[batch, d, L]``, ``A`` is ``[d, n]``, ``B`` and ``C`` are
``[batch, n, L]``, ``D`` is ``[d]``. The Triton kernel runs the recurrence in fp32 along L for a
block of channels, saving the state only at chunk boundaries; its backward walks the chunks in
reverse, recomputing each chunk's states from its boundary into a scratch buffer, then runs the
adjoint recurrence. softplus(delta + bias), the D skip and the z gate stay in torch around it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False):
    """The recurrence step by step in fp32 (the definition; transformers' MambaMixer slow path)."""
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    # Split along L once: indexing position t in the loop would make autograd write each step's
    # gradient into a zeroed full-size tensor (quadratic in L); unbind's backward is one stack.
    decay = torch.exp(delta[..., None] * A[:, None, :]).unbind(2)      # L x [b, d, n]
    drive = ((delta * u)[..., None] * B.transpose(1, 2)[:, None]).unbind(2)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    states = []
    for decay_t, drive_t in zip(decay, drive):
        h = torch.addcmul(drive_t, decay_t, h)
        states.append(h)
    y = torch.einsum("bdln,bnl->bdl", torch.stack(states, dim=2), C)
    y = _epilogue(y, u, D, z)
    return (y.to(dtype), h) if return_last_state else y.to(dtype)


class _ScanLoop(torch.autograd.Function):
    """The recurrence on CPU in plain torch, with a hand-written backward: per chunk of CHUNK
    positions the decays and inputs are formed in bulk and only one fused op per position runs
    in Python order; the backward recomputes each chunk's states from the state saved at its
    start and runs the adjoint recurrence the same way. No ``[b, d, L, n]`` tensor is ever
    held, and autograd sees one node instead of L (several times faster than the definition)."""

    CHUNK = 8

    @staticmethod
    def _positions_first(*tensors):
        """``[b, ., L]`` -> contiguous ``[L, b, .]``: each chunk is then one contiguous slice."""
        return tuple(t.permute(2, 0, 1).contiguous() for t in tensors)

    @staticmethod
    def _chunk_terms(A, delta_t, du_t, B_t):
        """Positions ``[k, b, d]`` -> (decay, drive), ``[k, b, d, n]``."""
        return torch.exp(delta_t[..., None] * A), du_t[..., None] * B_t[:, :, None, :]

    @staticmethod
    def _states(h, decay, drive):
        """The chunk's states ``[k, b, d, n]`` from the state entering it."""
        states = torch.empty_like(decay)
        for i in range(decay.shape[0]):
            h = torch.addcmul(drive[i], decay[i], h, out=states[i])
        return states

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        uT, dT, BT, CT = _ScanLoop._positions_first(u, delta, B, C)
        duT = dT * uT
        length, K = uT.shape[0], _ScanLoop.CHUNK
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        entering, ys = [], []
        for s in range(0, length, K):
            entering.append(h)
            decay, drive = _ScanLoop._chunk_terms(A, dT[s:s + K], duT[s:s + K], BT[s:s + K])
            states = _ScanLoop._states(h, decay, drive)
            ys.append((states * CT[s:s + K, :, None, :]).sum(-1))
            h = states[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(entering))
        ctx.mark_non_differentiable(h)
        return torch.cat(ys).permute(1, 2, 0), h

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, entering = ctx.saved_tensors
        uT, dT, BT, CT, dyT = _ScanLoop._positions_first(u, delta, B, C, dy.to(u.dtype))
        duT = dT * uT
        length, K = uT.shape[0], _ScanLoop.CHUNK
        d_du, d_delta = torch.empty_like(duT), torch.empty_like(duT)
        dB, dC = torch.empty_like(BT), torch.empty_like(CT)
        dA = torch.zeros_like(A)
        carry = torch.zeros_like(entering[0])   # decay_{t+1} * dL/dh_{t+1}, from the next chunk
        for c in reversed(range(entering.shape[0])):
            s = c * K
            e = min(s + K, length)
            decay, drive = _ScanLoop._chunk_terms(A, dT[s:e], duT[s:e], BT[s:e])
            states = _ScanLoop._states(entering[c], decay, drive)
            previous = torch.cat([entering[c][None], states[:-1]])
            grads = dyT[s:e, :, :, None] * CT[s:e, :, None, :]          # dL/dh_t from y_t
            for i in reversed(range(e - s)):
                torch.add(grads[i], carry, out=grads[i])                # + from h_{t+1}
                carry = grads[i] * decay[i]
            dC[s:e] = (states * dyT[s:e, :, :, None]).sum(2)
            dB[s:e] = (grads * duT[s:e, :, :, None]).sum(2)
            d_du[s:e] = (grads * BT[s:e, :, None, :]).sum(-1)
            d_dA = grads * previous * decay                             # d/d(delta * A)
            d_delta[s:e] = (d_dA * A).sum(-1)
            dA += (d_dA * dT[s:e, :, :, None]).sum((0, 1))
        du = (d_du * dT).permute(1, 2, 0)
        ddelta = (d_delta + d_du * uT).permute(1, 2, 0)
        return du, ddelta, dA, dB.permute(1, 2, 0), dC.permute(1, 2, 0)


def _epilogue(y, u, D, z):
    if D is not None:
        y = y + u.float() * D[:, None].float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


@triton.jit
def _tile(a_ptr, pb, dim, dstate, length, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels and states, their masks, its block of A, and the row offsets of
    u/delta/y (``[b, d, L]``) and of B/C (``[b, n, L]``)."""
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    st = tl.arange(0, BLOCK_N)
    ch_ok = ch < dim
    st_ok = st < dstate
    ok2 = ch_ok[:, None] & st_ok[None, :]
    A = tl.load(a_ptr + ch[:, None] * dstate + st[None, :], mask=ok2, other=0.0).to(tl.float32)
    return (ch, st, ch_ok, st_ok, ok2, A, (pb * dim + ch).to(tl.int64) * length,
            (pb * dstate + st).to(tl.int64) * length)


@triton.jit
def _step_inputs(u_ptr, dt_ptr, b_ptr, row, bc, t, ch_ok, st_ok):
    u = tl.load(u_ptr + row + t, mask=ch_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row + t, mask=ch_ok, other=0.0).to(tl.float32)
    Bt = tl.load(b_ptr + bc + t, mask=st_ok, other=0.0).to(tl.float32)
    return u, dt, Bt


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, y_ptr, ckpt_ptr, last_ptr, dim, dstate, length,
              n_chunks, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pb = tl.program_id(0)
    ch, st, ch_ok, st_ok, ok2, A, row, bc = _tile(a_ptr, pb, dim, dstate, length, BLOCK_D, BLOCK_N)
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for k in range(0, n_chunks):
        # the state entering chunk k, for the backward's recomputation
        ck = ((pb * n_chunks + k) * dim + ch[:, None]).to(tl.int64) * dstate + st[None, :]
        tl.store(ckpt_ptr + ck, h, mask=ok2)
        for i in range(0, CHUNK):
            t = k * CHUNK + i
            if t < length:
                u, dt, Bt = _step_inputs(u_ptr, dt_ptr, b_ptr, row, bc, t, ch_ok, st_ok)
                Ct = tl.load(c_ptr + bc + t, mask=st_ok, other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                tl.store(y_ptr + row + t, tl.sum(h * Ct[None, :], 1), mask=ch_ok)
    last = (pb * dim + ch[:, None]).to(tl.int64) * dstate + st[None, :]
    tl.store(last_ptr + last, h, mask=ok2)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dy_ptr, ckpt_ptr, scratch_ptr,
              du_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr, dim, dstate, length, n_chunks,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pb = tl.program_id(0)
    pd = tl.program_id(1)
    ch, st, ch_ok, st_ok, ok2, A, row, bc = _tile(a_ptr, pb, dim, dstate, length, BLOCK_D, BLOCK_N)
    # this program's scratch: CHUNK + 1 states (slot 0: the state entering the chunk)
    program = pb * tl.num_programs(1) + pd
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + st[None, :]
    scratch = scratch_ptr + program.to(tl.int64) * (CHUNK + 1) * BLOCK_D * BLOCK_N + tile
    carry = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)        # a_{t+1} * dh_{t+1}
    dA = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        ck = ((pb * n_chunks + k) * dim + ch[:, None]).to(tl.int64) * dstate + st[None, :]
        h = tl.load(ckpt_ptr + ck, mask=ok2, other=0.0)
        tl.store(scratch, h)
        for i in range(0, CHUNK):                           # recompute the chunk's states
            t = k * CHUNK + i
            if t < length:
                u, dt, Bt = _step_inputs(u_ptr, dt_ptr, b_ptr, row, bc, t, ch_ok, st_ok)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                tl.store(scratch + (i + 1) * BLOCK_D * BLOCK_N, h)
        for ii in range(0, CHUNK):                          # adjoint recurrence, backwards
            i = CHUNK - 1 - ii
            t = k * CHUNK + i
            if t < length:
                u, dt, Bt = _step_inputs(u_ptr, dt_ptr, b_ptr, row, bc, t, ch_ok, st_ok)
                Ct = tl.load(c_ptr + bc + t, mask=st_ok, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row + t, mask=ch_ok, other=0.0).to(tl.float32)
                h_t = tl.load(scratch + (i + 1) * BLOCK_D * BLOCK_N)
                h_prev = tl.load(scratch + i * BLOCK_D * BLOCK_N)
                a = tl.where(ok2, tl.exp(dt[:, None] * A), 0.0)
                dh = carry + dy[:, None] * Ct[None, :]
                dh = tl.where(ok2, dh, 0.0)
                tl.atomic_add(dc_ptr + bc + t, tl.sum(dy[:, None] * h_t, 0), mask=st_ok)
                tl.atomic_add(db_ptr + bc + t, tl.sum(dh * (dt * u)[:, None], 0), mask=st_ok)
                tl.store(du_ptr + row + t, tl.sum(dh * Bt[None, :], 1) * dt, mask=ch_ok)
                da_dt = dh * h_prev * a                      # d/d(dt * A) of the decay term
                ddt = tl.sum(dh * Bt[None, :], 1) * u + tl.sum(da_dt * A, 1)
                tl.store(ddt_ptr + row + t, ddt, mask=ch_ok)
                dA += da_dt * dt[:, None]
                carry = a * dh
    tl.atomic_add(da_ptr + ch[:, None] * dstate + st[None, :], dA, mask=ok2)


class _ScanTriton(torch.autograd.Function):
    CHUNK = 64

    @staticmethod
    def _geometry(u, A):
        bsz, dim, length = u.shape
        dstate = A.shape[1]
        block_d = min(32, max(16, triton.next_power_of_2(dim)))
        block_n = max(16, triton.next_power_of_2(dstate))
        chunk = _ScanTriton.CHUNK
        return bsz, dim, length, dstate, block_d, block_n, chunk, triton.cdiv(length, chunk)

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        bsz, dim, length, dstate, block_d, block_n, chunk, n_chunks = _ScanTriton._geometry(u, A)
        y = torch.empty(u.shape, device=u.device, dtype=torch.float32)
        ckpt = torch.empty(bsz, n_chunks, dim, dstate, device=u.device, dtype=torch.float32)
        last = torch.empty(bsz, dim, dstate, device=u.device, dtype=torch.float32)
        grid = (bsz, triton.cdiv(dim, block_d))
        _scan_fwd[grid](u, delta, A, B, C, y, ckpt, last, dim, dstate, length, n_chunks,
                        CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(u, delta, A, B, C, ckpt)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        bsz, dim, length, dstate, block_d, block_n, chunk, n_chunks = _ScanTriton._geometry(u, A)
        grid = (bsz, triton.cdiv(dim, block_d))
        f32 = dict(device=u.device, dtype=torch.float32)
        scratch = torch.empty(grid[0] * grid[1], chunk + 1, block_d, block_n, **f32)
        du, ddelta = torch.empty(u.shape, **f32), torch.empty(u.shape, **f32)
        dA, dB, dC = torch.zeros(A.shape, **f32), torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        _scan_bwd[grid](u, delta, A, B, C, dy.contiguous().float(), ckpt, scratch,
                        du, ddelta, dA, dB, dC, dim, dstate, length, n_chunks,
                        CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype),
                dC.to(C.dtype))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Dispatcher (mamba-ssm's ``selective_scan_fn`` signature): the Triton kernel on CUDA, the
    chunked CPU loop elsewhere, the step-by-step definition when the reference mode is forced.
    Returns ``y`` (u's dtype), and the final state ``[b, d, n]`` (fp32) if
    asked."""
    if dispatch.mode() == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        return_last_state)
    if delta_bias is not None or delta_softplus:  # in fp32, as the kernel computes
        delta = delta.float() + (0.0 if delta_bias is None else delta_bias[..., None].float())
        delta = F.softplus(delta) if delta_softplus else delta
    if dispatch.use_triton(u, delta, A, B, C):
        y, last = _ScanTriton.apply(u, delta, A, B, C)
    else:
        y, last = _ScanLoop.apply(u.float(), delta.float(), A.float(), B.float(), C.float())
    y = _epilogue(y, u, D, z).to(u.dtype)
    return (y, last) if return_last_state else y
