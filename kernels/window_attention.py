"""Sliding-window GQA attention at any length without an N x N mask or score matrix.

Query i sees keys i - window < j <= i (Mistral's window). Past ``MAX_SEQ`` positions the
block-causal op of ``block_causal_attention.py`` would keep O(N x window) probabilities per layer
for its backward, and SDPA needs an N x N boolean mask (on CPU it then runs unfused, with N x N
scores). Here, per device:

- CPU (and CUDA as the last fallback): ``window_attention_blocked``. Query blocks of ``BLOCK``
  positions multiply only the keys their queries can see, ``[start - window + 1, start + block)``
  (at most window + block - 1), the query heads sharing a KV head folded into the rows of one
  matmul (no repeated K/V), the two ragged edges masked in place. The backward recomputes each
  block's probabilities instead of keeping them (flash attention's trade): what is saved for it is
  q, k and v, and what is live at any time is one block's scores, ``[b * g, r * block, window +
  block - 1]``, and the O(N d) blocked copies and gradients. Time grows linearly in N past the
  window. Document masking (``blocked``) is not supported here: ``causal_attention`` keeps SDPA
  with its mask for it (the model builds that mask N x N from segment ids already).
- CUDA: flash-attn's ``window_size=(window - 1, 0)`` when it is installed and the dtype is 16-bit,
  else FlexAttention (compiled) with a sliding-window block mask, which skips the blocks outside
  the band; the blocked path if FlexAttention is missing.

The reference all paths are tested against is ``model.attention.causal_attention(...,
backend="reference")`` (tests/test_window_attention.py; the CUDA paths only where CUDA is).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from . import dispatch
from .block_causal_attention import _from_blocks, _keys, _mask, _spans, _to_blocks

BLOCK = 32  # query positions per block: one block's scores stay in L2/L3 at head dims 32-64 (CPU)


def use_window_attention() -> bool:
    """Whether ``causal_attention`` takes this op for a window shorter than the sequence."""
    return dispatch.mode() != "reference"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Scores and sums in fp32 for 16-bit inputs (fp64 stays fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Scratch:
    """One block's score-sized buffers, reused for every block (sized for the widest span), so
    that a call allocates them once instead of once per block."""

    def __init__(self, like: torch.Tensor, count: int, bg: int, rows: int, keys: int):
        self.flat = [like.new_empty(bg * rows * keys) for _ in range(count)]
        self.bg, self.rows = bg, rows

    def get(self, i: int, keys: int) -> torch.Tensor:
        return self.flat[i][:self.bg * self.rows * keys].view(self.bg, self.rows, keys)


def _blocks(q, k, v, block: int, window: int):
    """Query blocks ``[nb, b*g, r*block, d]`` (scaled), keys and values ``[b*g, s_padded, d]``,
    in the compute dtype, and each block's (first query, end, first key)."""
    dtype = _compute_dtype(q)
    d = q.shape[-1]
    qb = _to_blocks(q, k.shape[1], block, d ** -0.5, dtype)
    return qb, _keys(k, block, dtype), _keys(v, block, dtype), _spans(q.shape[2], block, window)


def _probabilities(scratch: _Scratch, qb_i, kf, start: int, end: int, lo: int, block: int,
                   window: int) -> torch.Tensor:
    """One query block's softmax over the keys ``[lo, end)`` it can see (scratch 0 and 1)."""
    scores = torch.bmm(qb_i, kf[:, lo:end].transpose(1, 2), out=scratch.get(0, end - lo))
    _mask(scores, scratch.rows, block, start, lo, window)
    return torch.softmax(scores, dim=-1, out=scratch.get(1, end - lo))


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                   window: int) -> torch.Tensor:
    """The blocked forward (a plain function, so that tests can watch every buffer it makes)."""
    b, _, s, _ = q.shape
    qb, kf, vf, spans = _blocks(q, k, v, block, window)
    _, bg, rows, _ = qb.shape
    scratch = _Scratch(qb, 2, bg, rows, max(end - lo for _, end, lo in spans))
    out = torch.empty_like(qb)
    for i, (start, end, lo) in enumerate(spans):
        p = _probabilities(scratch, qb[i], kf, start, end, lo, block, window)
        torch.bmm(p, vf[:, lo:end], out=out[i])
    return _from_blocks(out, b, s, block, dtype=q.dtype)


def backward_blocks(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    block: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, recomputing each block's probabilities from q and k."""
    b, _, s, d = q.shape
    g = k.shape[1]
    qb, kf, vf, spans = _blocks(q, k, v, block, window)
    grad_b = _to_blocks(grad, g, block, dtype=qb.dtype)
    _, bg, rows, _ = qb.shape
    scratch = _Scratch(qb, 4, bg, rows, max(end - lo for _, end, lo in spans))
    dq = torch.empty_like(qb)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for i, (start, end, lo) in enumerate(spans):
        p = _probabilities(scratch, qb[i], kf, start, end, lo, block, window)
        dv[:, lo:end].baddbmm_(p.transpose(1, 2), grad_b[i])
        dp = torch.bmm(grad_b[i], vf[:, lo:end].transpose(1, 2), out=scratch.get(2, end - lo))
        # softmax backward: p * (dp - rowsum(dp * p)); masked entries have p = 0
        d_scores = torch.ops.aten._softmax_backward_data.out(
            dp, p, -1, p.dtype, grad_input=scratch.get(3, end - lo))
        torch.bmm(d_scores, kf[:, lo:end], out=dq[i])
        dk[:, lo:end].baddbmm_(d_scores.transpose(1, 2), qb[i])
    return (_from_blocks(dq, b, s, block, d ** -0.5, q.dtype),
            dk.view(b, g, -1, d)[:, :, :s].to(k.dtype).contiguous(),
            dv.view(b, g, -1, d)[:, :, :s].to(v.dtype).contiguous())


@torch.library.custom_op("fractal::window_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
             window: int) -> torch.Tensor:
    return forward_blocks(q, k, v, block, window)


@_forward.register_fake
def _(q, k, v, block, window):
    return q.new_empty(q.shape)


@torch.library.custom_op("fractal::window_attention_backward", mutates_args=())
def _backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
              window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_blocks(grad, q, k, v, block, window)


@_backward.register_fake
def _(grad, q, k, v, block, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block, window = inputs
    ctx.block, ctx.window = block, window
    ctx.save_for_backward(q, k, v)  # no probabilities: the backward recomputes them


def _autograd_backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, q, k, v, ctx.block, ctx.window)
    return dq, dk, dv, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def window_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             block: int = BLOCK) -> torch.Tensor:
    """The blocked op on any device: q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` -> ``[b, h, s, d]``."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    return _forward(q, k, v, block, window)


@lru_cache(maxsize=1)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@lru_cache(maxsize=1)
def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=16)
def window_block_mask(s: int, window: int, device: str):
    """FlexAttention's block mask of the band j <= i < j + window (blocks outside it skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, i, j):
        return (j <= i) & (i - j < window)

    return create_block_mask(in_window, None, None, s, s, device=device)


def window_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                          compiled: bool = True) -> torch.Tensor:
    """FlexAttention with the sliding-window block mask (``compiled=False``: eager, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex() if compiled else flex_attention
    mask = window_block_mask(q.shape[2], window, str(q.device))
    return attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal attention, q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` (h % g == 0) ->
    ``[b, h, s, d]``, on the best path the device has (module docstring)."""
    if q.is_cuda:
        flash = _flash_attn_func()
        if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            # flash-attn takes [b, s, heads, d] and GQA (fewer KV heads) as it is
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                        window_size=(window - 1, 0))
            return out.transpose(1, 2)
        if _has_flex():
            return window_attention_flex(q, k, v, window)
    return window_attention_blocked(q, k, v, window)
