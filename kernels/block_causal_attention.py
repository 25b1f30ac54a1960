"""Causal (optionally sliding-window) GQA attention for CPU training at short sequences: batched
matmuls over query blocks.

Why our own: PyTorch's CPU flash-attention kernel (what SDPA runs on CPU, for us and for
transformers) multiplies one (batch, head, 64-query block) at a time, and with head dims of 32-64
those GEMMs are too small for MKL: on the 2-core AVX2 machine it reaches ~50 GFLOP/s where a large
matmul reaches ~170. Here the query heads that share a KV head are folded into the rows of one
matmul (no repeated K/V), the causal triangle is covered by query blocks of ``block`` positions
(block i multiplies against keys ``[0, end_i)``, so only about (s + block) / 2s of the full score
matrix is computed), and the softmax probabilities are kept for the backward instead of being
recomputed. Measured fwd + bwd against SDPA's flash kernel on the 2-core machine (fp32, batch 8,
8 query / 2 KV heads; `bench attention --methods dense dense_ours`, reports/attention_block_op):
8-19% less time at s = 128-512 with head dim 32, 17-34% with head dim 64; at s = 1024 no gain
(the probabilities stop fitting in cache); at s = 64 flash covers a head's whole triangle in one
tile and is faster (13-37% less fwd + bwd time at head dims 32-64, with or without GQA; 4-7% of
the small bench train step, 4 layers x 128 wide, batch 12).
With Mistral's sliding window a block multiplies only the keys its queries can see (the window
before it and itself); against SDPA with the window as a mask (flash): 40% less at s = 256,
window 128, batch 16.

The cost is memory: the probabilities, ``b * heads * s * (s + block) / 2`` values per layer (fewer
with a window), are saved for the backward where flash saves O(s). ``use_block_causal`` therefore
takes this path only on CPU, in fp32/fp64, from ``MIN_SEQ`` up to ``MAX_SEQ`` positions and ``MAX_PROB_BYTES`` of
probabilities per call; ``model.kernels=reference`` turns it off (SDPA).
The reference it is tested against is ``model.attention.causal_attention(..., backend="reference")``.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from . import dispatch

BLOCK = 32      # query positions per block: fastest at head dims 32-64 on the CPUs measured
MIN_SEQ = 128   # measured: at 64 positions flash's single tile is faster (13-37% less time)
MAX_SEQ = 512   # measured: at 1024 flash is as fast, and it keeps O(s) memory
MAX_PROB_BYTES = 256 * 2**20  # per call (per layer); a larger batch x heads falls back to flash


def use_block_causal(q: torch.Tensor, window: int = 0) -> bool:
    b, h, s, _ = q.shape
    return (dispatch.mode() != "reference" and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64) and MIN_SEQ <= s <= MAX_SEQ
            and _prob_count(b, h, s, BLOCK, window) * q.element_size() <= MAX_PROB_BYTES)


def _block_count(s: int, block: int) -> int:
    return -(-s // block)


def _spans(s: int, block: int, window: int) -> list[tuple[int, int, int]]:
    """(first query, end, first key) of each query block: its keys are ``[first key, end)``, all
    earlier positions, or the last ``window`` - 1 before the block and the block itself."""
    spans = []
    for start in range(0, _block_count(s, block) * block, block):
        spans.append((start, start + block, max(0, start - window + 1) if window > 0 else 0))
    return spans


def _prob_count(b: int, h: int, s: int, block: int, window: int) -> int:
    """Probabilities kept per call: ``block`` rows per query head and block, one per key."""
    return sum(b * h * block * (end - lo) for _, end, lo in _spans(s, block, window))


def _prob_views(flat: torch.Tensor, bg: int, rows: int, spans) -> list[torch.Tensor]:
    """Each query block's probabilities ``[b*g, r*block, keys]`` as views of one flat buffer
    (the op returns plain tensors: inductor's C++ wrapper takes no lists)."""
    views, offset = [], 0
    for _, end, lo in spans:
        size = bg * rows * (end - lo)
        views.append(flat[offset:offset + size].view(bg, rows, end - lo))
        offset += size
    return views


@lru_cache(maxsize=16)
def _future(n: int, device: str) -> torch.Tensor:
    """True above the diagonal of a query block's own keys."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


@lru_cache(maxsize=64)
def _too_far(n: int, columns: int, shift: int, device: str) -> torch.Tensor:
    """True where key column j is ``window`` or more behind query row a: j <= a + shift."""
    a = torch.arange(n, device=device)[:, None]
    return torch.arange(columns, device=device)[None, :] <= a + shift


def _mask(scores: torch.Tensor, rows: int, block: int, start: int, lo: int, window: int) -> None:
    """-inf, in place, on a block's future keys (the last ``block`` columns, above the diagonal)
    and, with a window, on keys ``window`` or more behind (only the first columns can be)."""
    bg, _, keys = scores.shape
    view = scores.view(bg, rows // block, block, keys)
    view[..., keys - block:].masked_fill_(_future(block, str(scores.device)), float("-inf"))
    if window > 0:
        # query start + a sees key lo + j only if j > a + (start - lo) - window
        columns = min(keys, start - lo + block - window)
        if columns > 0:
            view[..., :columns].masked_fill_(
                _too_far(block, columns, start - lo - window, str(scores.device)), float("-inf"))


def _padded(x: torch.Tensor, block: int) -> torch.Tensor:
    """Zero positions up to a multiple of ``block``. Harmless under causality: a padded key is
    seen only by padded queries, whose outputs are dropped and whose gradients are zero."""
    pad = _block_count(x.shape[2], block) * block - x.shape[2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _to_blocks(x: torch.Tensor, groups: int, block: int, scale: float = 1.0,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[b, h, s, d]`` -> ``[nb, b*g, r*block, d]``: each query block's rows for one matmul per
    KV head (the r query heads sharing it stacked), scaled (and cast to ``dtype``), in one copy."""
    x = _padded(x, block)
    b, h, s, d = x.shape
    nb, r = s // block, h // groups
    out = x.new_empty(nb, b * groups, r * block, d, dtype=dtype)
    torch.mul(x.view(b, groups, r, nb, block, d).permute(3, 0, 1, 2, 4, 5), scale,
              out=out.view(nb, b, groups, r, block, d))
    return out


def _from_blocks(xb: torch.Tensor, b: int, s: int, block: int, scale: float = 1.0,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of ``_to_blocks``: ``[nb, b*g, r*block, d]`` -> ``[b, h, s, d]``, contiguous."""
    nb, bg, rows, d = xb.shape
    g, r = bg // b, rows // block
    out = xb.new_empty(b, g, r, nb, block, d, dtype=dtype)
    torch.mul(xb.view(nb, b, g, r, block, d).permute(1, 2, 3, 0, 4, 5), scale, out=out)
    out = out.view(b, g * r, nb * block, d)
    return out if nb * block == s else out[:, :, :s].contiguous()


def _keys(x: torch.Tensor, block: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[b, g, s, d]`` -> ``[b*g, s_padded, d]``, contiguous: every block multiplies a slice."""
    x = _padded(x, block)
    x = x.reshape(-1, x.shape[2], x.shape[3])
    return x.to(dtype or x.dtype).contiguous()


@torch.library.custom_op("fractal::block_causal_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
             window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out ``[b, h, s, d]``, every query block's softmax probabilities, flat)."""
    b, h, s, d = q.shape
    g = k.shape[1]
    qb, kf, vf = _to_blocks(q, g, block, d ** -0.5), _keys(k, block), _keys(v, block)
    _, bg, rows, _ = qb.shape
    spans = _spans(s, block, window)
    out = torch.empty_like(qb)
    flat = q.new_empty(_prob_count(b, h, s, block, window))
    for i, ((start, end, lo), p) in enumerate(zip(spans, _prob_views(flat, bg, rows, spans))):
        scores = torch.bmm(qb[i], kf[:, lo:end].transpose(1, 2))
        _mask(scores, rows, block, start, lo, window)
        torch.softmax(scores, dim=-1, out=p)
        torch.bmm(p, vf[:, lo:end], out=out[i])
    return _from_blocks(out, b, s, block), flat


@_forward.register_fake
def _(q, k, v, block, window):
    b, h, s, d = q.shape
    return q.new_empty(b, h, s, d), q.new_empty(_prob_count(b, h, s, block, window))


@torch.library.custom_op("fractal::block_causal_attention_backward", mutates_args=())
def _backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              probs: torch.Tensor, block: int,
              window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, s, d = q.shape
    g = k.shape[1]
    qb, kf, vf = _to_blocks(q, g, block, d ** -0.5), _keys(k, block), _keys(v, block)
    grad_b = _to_blocks(grad, g, block)
    _, bg, rows, _ = qb.shape
    spans = _spans(s, block, window)
    dq = torch.empty_like(qb)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for i, ((_, end, lo), p) in enumerate(zip(spans, _prob_views(probs, bg, rows, spans))):
        dv[:, lo:end] += torch.bmm(p.transpose(1, 2), grad_b[i])
        # softmax backward: p * (dp - rowsum(dp * p)), one kernel; masked entries have p = 0
        d_scores = torch._softmax_backward_data(torch.bmm(grad_b[i], vf[:, lo:end].transpose(1, 2)),
                                                p, -1, p.dtype)
        torch.bmm(d_scores, kf[:, lo:end], out=dq[i])
        dk[:, lo:end] += torch.bmm(d_scores.transpose(1, 2), qb[i])
    return (_from_blocks(dq, b, s, block, d ** -0.5),
            dk.view(b, g, -1, d)[:, :, :s].contiguous(), dv.view(b, g, -1, d)[:, :, :s].contiguous())


@_backward.register_fake
def _(grad, q, k, v, probs, block, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block, window = inputs
    ctx.block, ctx.window = block, window
    ctx.save_for_backward(q, k, v, output[1])
    ctx.set_materialize_grads(False)  # the probabilities get no gradient: do not zero-fill one


def _autograd_backward(ctx, grad_out, grad_probs):
    if grad_out is None:
        return None, None, None, None, None
    q, k, v, probs = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, q, k, v, probs, ctx.block, ctx.window)
    return dq, dk, dv, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0,
                           block: int = BLOCK) -> torch.Tensor:
    """Causal attention, q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` (h % g == 0) -> ``[b, h, s, d]``;
    ``window`` > 0: query i sees keys i - window < j <= i (Mistral's sliding window)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    return _forward(q, k, v, block, max(window, 0))[0]
