"""Entropy patching of byte streams (BSFIN; close to the Byte Latent Transformer's patcher).

A new patch starts at byte t when the entropy of predicting byte t crosses a threshold (global:
``H_t > threshold``; relative: ``H_t - H_{t-1} > threshold``), the current patch has at least
``min_size`` bytes, or it has ``max_size`` bytes already; never inside a UTF-8 character. The
entropy ``H_t`` comes from bytes before t only: a causal byte model's next-byte entropy, or the
design document's sliding-window Shannon entropy of the ``window`` bytes before t. Whether t
continues a UTF-8 character is also read from the bytes before t (the last lead byte announces
the character's length), so every boundary decision, and the end of every patch, is known from
the bytes up to that end: what a causal model needs. ``max_size`` can be exceeded by at most
three bytes, to finish a character. Ids >= 256 (document separators) are single-byte characters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchRule:
    threshold: float
    relative: bool = False
    min_size: int = 1
    max_size: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"patch sizes need 1 <= min_size ({self.min_size}) <= max_size ({self.max_size})")


def utf8_continues(ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: byte t is announced as part of a character that started before t (from the
    lead bytes at t-1..t-3 only). On valid UTF-8 this is exactly "t is a continuation byte"."""
    length = torch.ones_like(ids)
    for low, high, n in ((0xC0, 0xDF, 2), (0xE0, 0xEF, 3), (0xF0, 0xF7, 4)):
        length = torch.where((ids >= low) & (ids <= high), torch.full_like(ids, n), length)
    inside = torch.zeros_like(ids, dtype=torch.bool)
    for back in (1, 2, 3):
        inside[:, back:] |= length[:, :-back] > back
    return inside


def window_entropy(ids: torch.Tensor, window: int) -> torch.Tensor:
    """``[b, s + 1]``: Shannon entropy (bits) of the byte histogram of the ``window`` bytes before
    t, for t = 0..s (fewer bytes at the start; 0 for t = 0)."""
    b, s = ids.shape
    onehot = torch.zeros(b, s + 1, 257, dtype=torch.float64)
    onehot[:, 1:].scatter_(2, ids.clamp(max=256)[..., None].long(), 1.0)
    counts = onehot.cumsum(1)                                          # counts[t]: bytes < t
    before = torch.cat([torch.zeros_like(counts[:, :1]).expand(b, window, -1), counts], 1)[:, :s + 1]
    p = (counts - before) / (counts - before).sum(-1, keepdim=True).clamp(min=1)
    return (-(p * torch.log2(p.clamp(min=1e-300))).sum(-1)).float()


def model_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[b, s + 1]``: entropy (bits) of predicting byte t for t = 0..s, from a causal model's
    ``logits [b, s, V]`` (the prediction made at t - 1; 0 for t = 0)."""
    logp = torch.log_softmax(logits.float(), -1)
    h = -(logp.exp() * logp).sum(-1) / math.log(2)
    return torch.cat([torch.zeros_like(h[:, :1]), h], 1)


def patch_starts(ids: torch.Tensor, entropy: torch.Tensor, rule: PatchRule) -> torch.Tensor:
    """``[b, s + 1]`` bool: a patch starts at t, from ``entropy [b, s + 1]`` (t = s: the row's last
    patch is complete, i.e. the next byte would start one). Deterministic; batched over rows."""
    b, s = ids.shape
    score = entropy - torch.cat([entropy[:, :1], entropy[:, :-1]], 1) if rule.relative else entropy
    wants = score > rule.threshold
    blocked = utf8_continues(torch.cat([ids, torch.zeros_like(ids[:, :1])], 1))  # reads bytes < t only
    starts = torch.zeros(b, s + 1, dtype=torch.bool)
    starts[:, 0] = True
    size = torch.ones(b, dtype=torch.long)
    for t in range(1, s + 1):
        start = ~blocked[:, t] & ((size >= rule.max_size) | (wants[:, t] & (size >= rule.min_size)))
        starts[:, t] = start
        size = torch.where(start, torch.ones_like(size), size + 1)
    return starts


@dataclass
class Patches:
    """Per byte: its patch index; per patch: first byte, end (last byte + 1) and whether the
    patch is complete (its end is known); ``count`` patches per row."""
    index: torch.Tensor     # [b, s] long
    start: torch.Tensor     # [b, P] long (padding: s)
    end: torch.Tensor       # [b, P] long (padding: s)
    complete: torch.Tensor  # [b, P] bool (padding: False)
    count: torch.Tensor     # [b] long


def patches_from_starts(starts: torch.Tensor) -> Patches:
    b, s1 = starts.shape
    s = s1 - 1
    index = starts[:, :s].long().cumsum(1) - 1                          # [b, s]
    count = starts[:, :s].sum(1)
    p_max = int(count.max()) if s else 0
    start = torch.full((b, p_max), s, dtype=torch.long)
    end = torch.full((b, p_max), s, dtype=torch.long)
    complete = torch.zeros(b, p_max, dtype=torch.bool)
    rows, cols = starts[:, :s].nonzero(as_tuple=True)
    start[rows, index[rows, cols]] = cols
    # a patch ends where the next starts; the last one at s (complete only if starts[:, s])
    nxt = torch.cat([start[:, 1:], torch.full((b, 1), s, dtype=torch.long)], 1)
    real = torch.arange(p_max)[None] < count[:, None]
    end = torch.where(real, nxt.clamp(max=s), end)
    last = (count - 1).clamp(min=0)
    complete = real & ((torch.arange(p_max)[None] < last[:, None]) | starts[:, s][:, None])
    return Patches(index=index, start=start, end=end, complete=complete, count=count)


def split(data: bytes, starts: torch.Tensor) -> list[bytes]:
    """The patches of one row as byte strings (``starts [s + 1]``)."""
    cuts = [int(t) for t in starts[:-1].nonzero().flatten()] + [len(data)]
    return [data[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def statistics(patches: Patches) -> dict[str, float]:
    """Mean, smallest and largest length in bytes of the complete patches, and patches per row."""
    lengths = (patches.end - patches.start)[patches.complete].float()
    if lengths.numel() == 0:
        lengths = torch.zeros(1)
    return {"patch_mean_bytes": float(lengths.mean()), "patch_min_bytes": float(lengths.min()),
            "patch_max_bytes": float(lengths.max()), "patches_per_row": float(patches.count.float().mean())}
