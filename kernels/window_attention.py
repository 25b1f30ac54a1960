"""Sliding-window GQA attention at any length without an N x N mask or score matrix.

Query i sees keys i - window < j <= i (Mistral's window). Past ``MAX_SEQ`` positions the
block-causal op of ``block_causal_attention.py`` would keep O(N x window) probabilities per layer
for its backward, and SDPA needs an N x N mask, with which its kernels compute all N x N scores
(2x dense causal's work). Here, per device:

- CPU (and CUDA as the last fallback): ``window_attention_blocked``. The first ``window``
  queries see every earlier key: one causal call. Past them, query blocks of ``block`` positions
  attend only to the keys their queries can see, ``[start - window + 1, start + block)`` (window
  + block - 1), the query heads sharing a KV head folded into the block's rows (no repeated K/V),
  ``GROUP`` blocks per call side by side as heads, their overlapping key ranges as strided views
  of one key buffer. On CPU each call is PyTorch's fused flash kernel (the one SDPA runs: private
  ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, called directly so that
  the log-sum-exp is kept and the blocks' key gradients add into one buffer) with a band mask
  ``[r * block, window + block - 1]`` shared by all blocks; elsewhere it is matmuls and a
  softmax. Saved for the backward: q, k, v, the output and the log-sum-exp (O(N d)); the
  probabilities are recomputed call by call. Beside O(N d) copies and gradients, the largest
  buffers are one call's (the mask; on the matmul path the scores); time grows linearly in N
  past the window. Measured against dense causal SDPA: README, "Attention scaling".
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
import torch.nn.functional as F

from . import dispatch

# Query positions per block (times the r query heads per KV head: the flash kernel's rows). 256
# measured fastest at window 4096, head dim 64, 8/2 heads on the 2-core CPU (128 and 512 ~10%
# slower); shorter windows take blocks as short as the window, down to 32, to waste less.
BLOCK = 256
# Blocks per kernel call, side by side as heads: fewer, longer calls lose less to the threads'
# barriers when the cores are shared (per-block calls ran 1.85x dense at 8k under load 20).
GROUP = 4
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def use_window_attention() -> bool:
    """Whether ``causal_attention`` takes this op for a window shorter than the sequence."""
    return dispatch.mode() != "reference"


def default_block(window: int) -> int:
    return max(32, min(BLOCK, window))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Geometry:
    """Queries ``[0, prefix)`` (prefix = min(window, s)) see every earlier key: plain causal
    attention. Past it, block i holds queries ``[prefix + i*block, ...)`` and its keys are
    ``[lo_i, lo_i + keys)``, lo_i = first_key + i*block, keys = window + block - 1, every block the
    same shape; the sequence is zero-padded to ``padded`` (padded keys are seen only by padded
    queries, whose outputs are dropped and whose gradients are zero)."""

    def __init__(self, s: int, block: int, window: int):
        self.block, self.window = block, window
        self.prefix = min(window, s)
        self.blocks = -(-(s - self.prefix) // block)
        self.padded = self.prefix + self.blocks * block
        self.keys = window + block - 1
        self.first_key = self.prefix - window + 1

    def groups(self):
        """(first block, count) of each kernel call."""
        return [(i, min(GROUP, self.blocks - i)) for i in range(0, self.blocks, GROUP)]

    def lo(self, i: int) -> int:
        return self.first_key + i * self.block

    def slabs(self, kf: torch.Tensor, i: int, n: int) -> torch.Tensor:
        """Keys of blocks i..i+n as ``[b*g, n, keys, d]``: overlapping views of ``kf``, no copy."""
        return kf[:, self.first_key:].unfold(1, self.keys, self.block)[:, i:i + n].transpose(-1, -2)

    def gather(self, x: torch.Tensor, i: int, n: int) -> torch.Tensor:
        """``[b*g, r, padded, d]`` -> blocks i..i+n as ``[b*g, n, r*block, d]`` (heads in rows)."""
        bg, r, _, d = x.shape
        start = self.prefix + i * self.block
        x = x[:, :, start:start + n * self.block].reshape(bg, r, n, self.block, d)
        return x.transpose(1, 2).reshape(bg, n, r * self.block, d)

    def scatter(self, dst: torch.Tensor, x: torch.Tensor, i: int) -> None:
        """Inverse of ``gather``, into ``dst`` in place."""
        bg, n, _, d = x.shape
        r = dst.shape[1]
        start = self.prefix + i * self.block
        dst[:, :, start:start + n * self.block].view(bg, r, n, self.block, d).copy_(
            x.view(bg, n, r, self.block, d).transpose(1, 2))


@lru_cache(maxsize=8)
def band_mask(rows: int, block: int, window: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Additive mask ``[rows, window + block - 1]`` of a query block against its keys: row a
    (query a % block of the block) sees column j iff a % block <= j <= a % block + window - 1."""
    a = torch.arange(rows, device=device)[:, None] % block
    j = torch.arange(window + block - 1, device=device)[None, :]
    mask = torch.zeros(rows, window + block - 1, dtype=dtype, device=device)
    return mask.masked_fill_((j < a) | (j > a + window - 1), float("-inf"))


def _scores(q, k, mask, scale, dtype):
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)).mul_(scale)
    if mask is not None:
        return scores.add_(mask.to(dtype))
    future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
    return scores.masked_fill_(future, float("-inf"))


def _attend(q, k, v, mask, scale, fused: bool):
    """q ``[B, H, R, d]``, k/v ``[B, H, L, d]`` (views: expanded, overlapping), additive ``mask``
    ``[R, L]`` or None for causal (R = L) -> out, log-sum-exp ``[B, H, R]``."""
    if fused:
        return _FLASH(q, k, v, is_causal=mask is None, attn_mask=mask, scale=scale)
    scores = _scores(q, k, mask, scale, _lse_dtype(q.dtype))
    lse = scores.logsumexp(-1)
    return (scores.sub_(lse[..., None]).exp_() @ v.to(lse.dtype)).to(q.dtype), lse


def _attend_backward(grad, q, k, v, out, lse, mask, scale, fused: bool):
    """dq, dk, dv of ``_attend`` from its output and log-sum-exp (probabilities recomputed)."""
    if fused:
        return _FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask,
                               scale=scale)
    p = _scores(q, k, mask, scale, lse.dtype).sub_(lse[..., None]).exp_()
    dtype = q.dtype
    q, k, v, grad, out = (t.to(lse.dtype) for t in (q, k, v, grad, out))
    d_scores = (grad @ v.transpose(-1, -2)).sub_((grad * out).sum(-1, keepdim=True)).mul_(p)
    return ((d_scores @ k).mul_(scale).to(dtype), (d_scores.transpose(-1, -2) @ q).mul_(scale),
            p.transpose(-1, -2) @ grad)


def _layout(x: torch.Tensor, groups: int, padded: int) -> torch.Tensor:
    """``[b, n, s, d]`` -> ``[b*g, n/g, padded, d]``, contiguous: the heads sharing a KV head
    side by side, zero rows past s."""
    b, n, s, d = x.shape
    x = x.reshape(b * groups, n // groups, s, d)
    return (F.pad(x, (0, 0, 0, padded - s)) if padded > s else x).contiguous()


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, window: int,
                   fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out ``[b, h, s, d]``, log-sum-exp ``[b*g, r, padded]``); a plain function, so that
    tests can watch every buffer it makes."""
    b, h, s, d = q.shape
    g, geo = k.shape[1], _Geometry(s, block, window)
    qh = _layout(q, g, geo.padded)
    kf, vf = _layout(k, g, geo.padded)[:, 0], _layout(v, g, geo.padded)[:, 0]
    bg, r = qh.shape[:2]
    out = torch.empty_like(qh)
    lse = qh.new_empty(qh.shape[:3], dtype=_lse_dtype(q.dtype))
    p = geo.prefix
    out[:, :, :p], lse[:, :, :p] = _attend(qh[:, :, :p], kf[:, None, :p].expand(-1, r, -1, -1),
                                           vf[:, None, :p].expand(-1, r, -1, -1), None, d ** -0.5,
                                           fused)
    mask = band_mask(r * block, block, window, q.dtype, str(q.device))
    for i, n in geo.groups():
        out_g, lse_g = _attend(geo.gather(qh, i, n), geo.slabs(kf, i, n), geo.slabs(vf, i, n), mask,
                               d ** -0.5, fused)
        geo.scatter(out, out_g, i)
        geo.scatter(lse[..., None], lse_g[..., None], i)
    return out.view(b, h, geo.padded, d)[:, :, :s].contiguous(), lse


def backward_blocks(grad, q, k, v, out, lse, block: int, window: int,
                    fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, s, d = q.shape
    g, geo = k.shape[1], _Geometry(s, block, window)
    qh, gh, oh = (_layout(t, g, geo.padded) for t in (q, grad, out))
    kf, vf = _layout(k, g, geo.padded)[:, 0], _layout(v, g, geo.padded)[:, 0]
    bg, r = qh.shape[:2]
    dq = torch.empty_like(qh)
    dk, dv = (torch.zeros(bg, geo.padded, d, dtype=lse.dtype, device=q.device) for _ in range(2))
    p = geo.prefix
    dq[:, :, :p], dk_p, dv_p = _attend_backward(
        gh[:, :, :p], qh[:, :, :p], kf[:, None, :p].expand(-1, r, -1, -1),
        vf[:, None, :p].expand(-1, r, -1, -1), oh[:, :, :p], lse[:, :, :p], None, d ** -0.5, fused)
    dk[:, :p] += dk_p.sum(1)
    dv[:, :p] += dv_p.sum(1)
    mask = band_mask(r * block, block, window, q.dtype, str(q.device))
    for i, n in geo.groups():
        dq_g, dk_g, dv_g = _attend_backward(
            geo.gather(gh, i, n), geo.gather(qh, i, n), geo.slabs(kf, i, n), geo.slabs(vf, i, n),
            geo.gather(oh, i, n), geo.gather(lse[..., None], i, n)[..., 0], mask, d ** -0.5, fused)
        geo.scatter(dq, dq_g, i)
        for j in range(n):  # the blocks' key ranges overlap: add one by one
            lo = geo.lo(i + j)
            dk[:, lo:lo + geo.keys] += dk_g[:, j]
            dv[:, lo:lo + geo.keys] += dv_g[:, j]
    return (dq.view(b, h, geo.padded, d)[:, :, :s].contiguous(),
            dk[:, :s].reshape(b, g, s, d).to(k.dtype).contiguous(),
            dv[:, :s].reshape(b, g, s, d).to(v.dtype).contiguous())


@torch.library.custom_op("fractal::window_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, window: int,
             fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_blocks(q, k, v, block, window, fused)


@_forward.register_fake
def _(q, k, v, block, window, fused):
    b, h, s, d = q.shape
    g = k.shape[1]
    padded = _Geometry(s, block, window).padded
    return q.new_empty(q.shape), q.new_empty(b * g, h // g, padded, dtype=_lse_dtype(q.dtype))


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
