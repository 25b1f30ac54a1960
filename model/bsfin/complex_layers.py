"""Complex-valued layers for BSFIN's interference stack, on (real, imaginary) pairs of real tensors.

Pairs rather than torch.complex parameters: DeepSpeed's ZeRO partitioning, gradient clipping and
fp16/bf16 paths handle real tensors only, and SDPA has no complex kernel. tests/test_bsfin.py
checks every layer against a plain torch.complex reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Pair = tuple[torch.Tensor, torch.Tensor]


class ComplexLinear(nn.Module):
    """``z W^T + b`` with ``W = A + iB``, ``b`` complex."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.real, self.imag = nn.Linear(d_in, d_out, bias=False), nn.Linear(d_in, d_out, bias=False)
        for w in (self.real.weight, self.imag.weight):  # |W| has the variance of a real init
            nn.init.normal_(w, std=1 / math.sqrt(2 * d_in))
        self.bias = nn.Parameter(torch.zeros(2, d_out)) if bias else None

    def forward(self, z: Pair) -> Pair:
        re, im = z
        out_re, out_im = self.real(re) - self.imag(im), self.real(im) + self.imag(re)
        if self.bias is not None:
            out_re, out_im = out_re + self.bias[0], out_im + self.bias[1]
        return out_re, out_im


class ComplexLayerNorm(nn.Module):
    """Centre the complex vector, divide by the root mean square of its magnitudes, then a real
    gain and a complex bias."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.gain, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(2, d)), eps

    def forward(self, z: Pair) -> Pair:
        re, im = z[0] - z[0].mean(-1, keepdim=True), z[1] - z[1].mean(-1, keepdim=True)
        scale = torch.rsqrt((re * re + im * im).mean(-1, keepdim=True) + self.eps) * self.gain
        return re * scale + self.bias[0], im * scale + self.bias[1]


def rotate(z: Pair, angle: torch.Tensor) -> Pair:
    """``z * exp(i angle)``."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return z[0] * cos - z[1] * sin, z[0] * sin + z[1] * cos


def frequencies(d: int, theta: float = 10000.0) -> torch.Tensor:
    return theta ** (-torch.arange(d, dtype=torch.float32) / d)


class ComplexPositionalEncoding(nn.Module):
    """Adds ``exp(i p w_j s_j)`` at position p: RoPE-like frequencies ``w_j`` with learnable
    scales ``s_j`` (the design's "learnable frequency scaling")."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("base", frequencies(d), persistent=False)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, z: Pair) -> Pair:
        angle = torch.arange(z[0].shape[-2], device=z[0].device, dtype=z[0].dtype)[:, None] * (self.base * self.scale)
        return z[0] + torch.cos(angle), z[1] + torch.sin(angle)


class InterferenceAttention(nn.Module):
    """Complex Q/K/V; RoPE is a phase ``exp(i p w_j)`` on Q and K; a learnable head-mixing
    ("entanglement") matrix on Q and K; learnable per-head phase shifts on Q and K. Scores from the
    complex inner product ``c = sum_j q_j conj(k_j)``: ``classical`` takes Re(c) (the real dot
    product of [re, im]), ``quantum`` takes |c| (components interfere: aligned phases add up,
    opposed ones cancel). Real softmax weights, complex values. ``allowed [b, Pq, Pk]`` bool."""

    def __init__(self, d: int, heads: int, mode: str = "quantum", rope: bool = True, entangle: bool = True,
                 rope_theta: float = 10000.0):
        super().__init__()
        if d % heads:
            raise ValueError(f"complex width {d} must be divisible by {heads} heads")
        self.heads, self.dim, self.mode, self.rope = heads, d // heads, mode, rope
        self.q, self.k, self.v, self.o = (ComplexLinear(d, d) for _ in range(4))
        self.entangle = nn.Parameter(torch.eye(heads)) if entangle else None
        self.phase = nn.Parameter(torch.zeros(2, heads, self.dim))       # Q's and K's phase shifts
        self.register_buffer("freq", frequencies(self.dim, rope_theta), persistent=False)

    def _heads(self, z: Pair) -> Pair:
        b, p, _ = z[0].shape
        return tuple(t.view(b, p, self.heads, self.dim).transpose(1, 2) for t in z)   # [b, H, P, dh]

    def _prepare(self, z: Pair, which: int) -> Pair:
        if self.rope:
            z = rotate(z, torch.arange(z[0].shape[2], device=z[0].device, dtype=z[0].dtype)[:, None] * self.freq)
        if self.entangle is not None:
            z = tuple(torch.einsum("gh,bhpd->bgpd", self.entangle, t) for t in z)
        return rotate(z, self.phase[which][:, None])

    def forward(self, z: Pair, allowed: torch.Tensor) -> Pair:
        b, p, _ = z[0].shape
        q, k = self._prepare(self._heads(self.q(z)), 0), self._prepare(self._heads(self.k(z)), 1)
        v = self._heads(self.v(z))
        mask = allowed[:, None]
        if self.mode == "classical":   # Re(q conj k) = [q_re, q_im] . [k_re, k_im]: one SDPA call
            out = F.scaled_dot_product_attention(torch.cat(q, -1), torch.cat(k, -1), torch.cat(v, -1),
                                                 attn_mask=mask, scale=1 / math.sqrt(self.dim))
            out = out.split(self.dim, -1)
        else:
            c_re = q[0] @ k[0].transpose(-1, -2) + q[1] @ k[1].transpose(-1, -2)
            c_im = q[1] @ k[0].transpose(-1, -2) - q[0] @ k[1].transpose(-1, -2)
            scores = torch.sqrt(c_re * c_re + c_im * c_im + 1e-12) / math.sqrt(self.dim)
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
            out = (weights @ v[0], weights @ v[1])
        out = tuple(t.transpose(1, 2).reshape(b, p, -1) for t in out)
        return self.o(out)


class ComplexFeedForward(nn.Module):
    """Complex linear, SiLU on the real and imaginary parts separately ("split" activation),
    complex linear."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.down = ComplexLinear(d, hidden), ComplexLinear(hidden, d)

    def forward(self, z: Pair) -> Pair:
        return self.down(tuple(F.silu(t) for t in self.up(z)))


class InterferenceLayer(nn.Module):
    """Pre-norm residual block: interference attention, then the complex feed-forward."""

    def __init__(self, d: int, heads: int, hidden: int, mode: str, rope: bool, entangle: bool, eps: float):
        super().__init__()
        self.attn_norm, self.ffn_norm = ComplexLayerNorm(d, eps), ComplexLayerNorm(d, eps)
        self.attn = InterferenceAttention(d, heads, mode, rope, entangle)
        self.ffn = ComplexFeedForward(d, hidden)

    def forward(self, z: Pair, allowed: torch.Tensor) -> Pair:
        a = self.attn(self.attn_norm(z), allowed)
        z = (z[0] + a[0], z[1] + a[1])
        f = self.ffn(self.ffn_norm(z))
        return z[0] + f[0], z[1] + f[1]
