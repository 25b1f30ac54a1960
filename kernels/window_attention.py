"""Sliding-window GQA attention at any length without an N x N mask or score matrix.

Query i sees keys i - window < j <= i (Mistral's window). Past ``MAX_SEQ`` positions the
block-causal op of ``block_causal_attention.py`` would keep O(N x window) probabilities per layer
for its backward, and SDPA needs an N x N mask, with which its kernels compute all N x N scores
(2x dense causal's work). Here, per device:

- CPU (and CUDA as the last fallback): ``window_attention_blocked``. Query blocks of ``block``
  positions attend only to the keys their queries can see, ``[start - window + 1, start + block)``
  (at most window + block - 1), the query heads sharing a KV head folded into the block's rows
  (no repeated K/V). On CPU each block is one call of PyTorch's fused flash kernel (the one SDPA
  runs; private ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, called
  directly so that the blocks' key gradients add into one buffer and the log-sum-exp is kept) with
  a band mask ``[r * block, window + block - 1]`` shared by all blocks (the first blocks take its
  last columns); elsewhere each block is plain matmuls and a softmax. Saved for the backward: q, k,
  v, the output and the log-sum-exp (O(N d)); the probabilities are recomputed block by block.
  Largest buffer: the band mask, or one block's scores on the matmul path; time grows linearly in
  N past the window. Measured against dense causal SDPA: README, "Attention scaling".
- CUDA: flash-attn's ``window_size=(window - 1, 0)`` when it is installed and the dtype is 16-bit,
  else FlexAttention (compiled) with a sliding-window block mask, which skips the blocks outside
  the band; the blocked path if FlexAttention is missing.

Document masking (``blocked``) is not supported here: ``causal_attention`` keeps SDPA with its mask
for it (the model builds that mask N x N from segment ids already). The reference every path is
tested against is ``model.attention.causal_attention(..., backend="reference")``
(tests/test_window_attention.py; the CUDA paths only where CUDA is).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from . import dispatch
from .block_causal_attention import _from_blocks, _keys, _spans, _to_blocks

# Query positions per block (times the r query heads per KV head: the flash kernel's rows). 256
# measured fastest at window 4096, head dim 64, 8/2 heads on the 2-core CPU (128 and 512 ~10%
# slower); shorter windows take blocks as short as the window, down to 32, to waste less.
BLOCK = 256
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def use_window_attention() -> bool:
    """Whether ``causal_attention`` takes this op for a window shorter than the sequence."""
    return dispatch.mode() != "reference"


def default_block(window: int) -> int:
    return max(32, min(BLOCK, window))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@lru_cache(maxsize=8)
def band_mask(rows: int, block: int, window: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Additive mask ``[rows, window + block - 1]`` of a query block against keys ``[start -
    window + 1, start + block)``: row a (query start + a % block) sees column j iff
    a % block <= j <= a % block + window - 1. A block with fewer keys uses the last columns."""
    a = torch.arange(rows, device=device)[:, None] % block
    j = torch.arange(window + block - 1, device=device)[None, :]
    mask = torch.zeros(rows, window + block - 1, dtype=dtype, device=device)
    return mask.masked_fill_((j < a) | (j > a + window - 1), float("-inf"))


def _attend(q, k, v, mask, scale, fused: bool):
    """One block: q ``[bg, R, d]``, k/v ``[bg, L, d]``, mask ``[R, L]`` -> out, log-sum-exp."""
    if fused:
        out, lse = _FLASH(q[:, None], k[:, None], v[:, None], attn_mask=mask, scale=scale)
        return out[:, 0], lse[:, 0]
    ct = _lse_dtype(q.dtype)
    scores = torch.baddbmm(mask.to(ct), q.to(ct), k.to(ct).transpose(1, 2), alpha=scale)
    lse = scores.logsumexp(-1)
    return torch.bmm(scores.sub_(lse[..., None]).exp_(), v.to(ct)).to(q.dtype), lse


def _attend_backward(grad, q, k, v, out, lse, mask, scale, fused: bool):
    """Gradients of one block from its output and log-sum-exp (probabilities recomputed)."""
    if fused:
        dq, dk, dv = _FLASH_BACKWARD(grad[:, None], q[:, None], k[:, None], v[:, None], out[:, None],
                                     lse[:, None], 0.0, False, attn_mask=mask, scale=scale)
        return dq[:, 0], dk[:, 0], dv[:, 0]
    ct = lse.dtype
    q, k, v, grad, out = (t.to(ct) for t in (q, k, v, grad, out))
    p = torch.baddbmm(mask.to(ct), q, k.transpose(1, 2), alpha=scale).sub_(lse[..., None]).exp_()
    d_scores = torch.bmm(grad, v.transpose(1, 2)).sub_((grad * out).sum(-1, keepdim=True)).mul_(p)
    return (torch.bmm(d_scores, k).mul_(scale), torch.bmm(d_scores.transpose(1, 2), q).mul_(scale),
            torch.bmm(p.transpose(1, 2), grad))


def _layout(q, k, v, block: int, window: int):
    """Query blocks ``[nb, b*g, r*block, d]``, keys and values ``[b*g, s_padded, d]``, the band
    mask and each block's (first query, end, first key)."""
    qb, kf, vf = _to_blocks(q, k.shape[1], block), _keys(k, block), _keys(v, block)
    mask = band_mask(qb.shape[2], block, window, q.dtype, str(q.device))
    return qb, kf, vf, mask, _spans(q.shape[2], block, window)


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, window: int,
                   fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out ``[b, h, s, d]``, log-sum-exp ``[nb, b*g, r*block]``); a plain function, so that
    tests can watch every buffer it makes."""
    b, _, s, d = q.shape
    qb, kf, vf, mask, spans = _layout(q, k, v, block, window)
    out = torch.empty_like(qb)
    lse = qb.new_empty(qb.shape[:3], dtype=_lse_dtype(q.dtype))
    for i, (_, end, lo) in enumerate(spans):
        out[i], lse[i] = _attend(qb[i], kf[:, lo:end], vf[:, lo:end], mask[:, lo - end:],
                                 d ** -0.5, fused)
    return _from_blocks(out, b, s, block), lse


def backward_blocks(grad, q, k, v, out, lse, block: int, window: int,
                    fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, _, s, d = q.shape
    g = k.shape[1]
    qb, kf, vf, mask, spans = _layout(q, k, v, block, window)
    grad_b, out_b = _to_blocks(grad, g, block), _to_blocks(out, g, block)
    dq = torch.empty_like(qb)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for i, (_, end, lo) in enumerate(spans):
        dq[i], dk_i, dv_i = _attend_backward(grad_b[i], qb[i], kf[:, lo:end], vf[:, lo:end],
                                             out_b[i], lse[i], mask[:, lo - end:], d ** -0.5, fused)
        dk[:, lo:end] += dk_i
        dv[:, lo:end] += dv_i
    return (_from_blocks(dq, b, s, block), dk.view(b, g, -1, d)[:, :, :s].contiguous(),
            dv.view(b, g, -1, d)[:, :, :s].contiguous())


@torch.library.custom_op("fractal::window_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, window: int,
             fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_blocks(q, k, v, block, window, fused)


@_forward.register_fake
def _(q, k, v, block, window, fused):
    b, h, s, d = q.shape
    g = k.shape[1]
    nb = -(-s // block)
    return q.new_empty(q.shape), q.new_empty(nb, b * g, h // g * block, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("fractal::window_attention_backward", mutates_args=())
def _backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, block: int, window: int,
              fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_blocks(grad, q, k, v, out, lse, block, window, fused)


@_backward.register_fake
def _(grad, q, k, v, out, lse, block, window, fused):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block, window, fused = inputs
    ctx.block, ctx.window, ctx.fused = block, window, fused
    ctx.save_for_backward(q, k, v, *output)  # no probabilities: the backward recomputes them
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return None, None, None, None, None, None
    dq, dk, dv = _backward(grad_out, *ctx.saved_tensors, ctx.block, ctx.window, ctx.fused)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def window_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             block: int | None = None, fused: bool | None = None) -> torch.Tensor:
    """The blocked op: q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` -> ``[b, h, s, d]``. ``fused``:
    the CPU flash kernel per block (default on CPU), else matmuls and a softmax (any device)."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    fused = q.device.type == "cpu" if fused is None else fused
    return _forward(q, k, v, block or default_block(window), window, fused)[0]


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
