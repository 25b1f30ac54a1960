"""Causal (optionally sliding-window) GQA attention, as a megatron-core core-attention module.

Megatron hands core attention q ``[s, b, heads/tp, d]`` and k, v ``[s, b, groups/tp, d]`` (GQA
not expanded) after RoPE, and expects ``[s, b, heads/tp * d]`` back. Swapping this module in the
layer spec is the only change a new attention variant needs; TP/PP/ZeRO stay as they are.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from kernels.block_causal_attention import block_causal_attention, use_block_causal
from kernels.window_attention import use_window_attention, window_attention


@lru_cache(maxsize=16)
def sliding_window_mask(seq_len: int, window: int, device: str) -> torch.Tensor:
    """True where query i may attend key j: j <= i and i - j < window (Mistral's convention)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0,
                     backend: str = "sdpa", blocked: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` with h % g == 0 -> ``[b, h, s, d]``.

    ``window`` <= 0 or >= s means full causal attention. ``blocked`` (bool, broadcastable to
    ``[b, 1, s, s]``, True = may not attend) adds masking on top, e.g. across documents.
    ``backend="reference"`` is the plain softmax(QK^T) formulation tests compare the fast paths
    (the CPU block-causal op, the sliding-window op, SDPA) against. A window without ``blocked``
    never builds the N x N mask; with ``blocked`` (documents) it is SDPA with the mask.
    """
    s = q.shape[-2]
    windowed = 0 < window < s
    block_window = window if windowed else 0
    if backend != "reference" and blocked is None:
        if use_block_causal(q, block_window):
            # CPU: faster than SDPA's flash kernel (kernels/block_causal_attention.py)
            return block_causal_attention(q, k, v, block_window)
        if windowed and use_window_attention():
            # no N x N mask at any length (kernels/window_attention.py)
            return window_attention(q, k, v, window)
    allowed = None
    if windowed or blocked is not None or backend == "reference":
        allowed = sliding_window_mask(s, window if windowed else s, str(q.device))
        if blocked is not None:
            allowed = allowed & ~blocked
    if backend == "reference":
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    gqa = q.shape[1] != k.shape[1]
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


class SlidingWindowCoreAttention(nn.Module):
    """Drop-in for megatron's DotProductAttention (no dropout: pretraining runs without it).
    ``capture`` (a list, set by the interpretability proxy) receives this layer's q and k."""

    def __init__(self, config, layer_number: int = 1, attn_mask_type=None, attention_type=None,
                 *, sliding_window: int = 0, backend: str = "sdpa", **kwargs):
        super().__init__()
        self.config = config
        self.sliding_window = sliding_window
        self.backend = backend
        self.kv_cache = None  # lent for one step by incremental decoding (model/mistral/decode.py)
        self.capture: list | None = None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **kwargs):
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.capture is not None:
            self.capture.append((q.detach(), k.detach()))
        if self.kv_cache is not None:
            out = self.kv_cache.attend(q, k, v)
        else:
            # Megatron's convention: attention_mask True = masked out (here: across documents).
            out = causal_attention(q, k, v, self.sliding_window, self.backend, blocked=attention_mask)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
