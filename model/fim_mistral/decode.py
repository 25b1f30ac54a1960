"""FIM attention's KV cache: one query at a time, the same attention as the full forward.

A query at position t in leaf block c attends (kernels/fim_geometry.py) to the earlier tokens of
its block, to the top-k routed earlier blocks of its key/value group and to the mean-pooled
summaries of its unit's earlier siblings at every level. All of it depends on complete blocks
only, so the cache does the work once per block: when block c - 1 completes (at the first token
of block c) it pools its keys and values (and every level's unit it completes: the mean of the
children's means, as ``pooled_levels`` computes them) and routes block c with the mean query of
block c - 1 against the mean keys of blocks 0..c-2. A step then gathers at most
B + k B + levels (b - 1) keys. The decoding loop around it is Mistral's (model/mistral/decode.py).
"""
from __future__ import annotations

import math

import torch

from kernels.fim_attention import fim_attention
from kernels.fim_geometry import FimGeometry
from model.mistral.decode import grouped_attention


class FimCache:
    def __init__(self, geometry: FimGeometry, branches: tuple[str, ...], capacity: int):
        self.geom, self.capacity = geometry, capacity
        self.routed = "routed" in branches and geometry.top_k > 0
        self.levels = geometry.levels if "hierarchical" in branches else 0
        self.branches = branches
        self.k = None
        self.length = 0

    def _allocate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        b, g, _, d = k.shape
        B, br = self.geom.block, self.geom.branching
        blocks = -(-self.capacity // B)
        self.k, self.v = (k.new_zeros(b, g, blocks * B, d) for _ in range(2))  # whole blocks
        self.block_queries = q.new_zeros(b, q.shape[1], B, d)                  # the current block's
        units = [-(-blocks // br ** m) for m in range(max(self.levels, 1))]
        self.summary_k = [k.new_zeros(b, g, u, d) for u in units]   # level 0: the block means
        self.summary_v = [k.new_zeros(b, g, u, d) for u in units]
        self.route = None                                            # [b, g, kk]: current block's

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` of the next s positions -> ``[b, h, s, d]``."""
        B = self.geom.block
        if self.k is None:  # the first tokens: the full forward's attention, then its bookkeeping
            out = fim_attention(q, k, v, self.geom, self.branches)
            self._allocate(q, k)
            n = k.shape[2]
            self.k[:, :, :n], self.v[:, :, :n] = k, v
            for c in range(1, (n - 1) // B + 1):
                self._close_block(c, q[:, :, (c - 1) * B:c * B])
            start = (n - 1) // B * B
            self.block_queries[:, :, :n - start] = q[:, :, start:]
            self.length = n
            return out
        if q.shape[2] != 1:
            raise ValueError("a filled KV cache takes one position at a time")
        t = self.length
        c, offset = divmod(t, B)
        if offset == 0:
            self._close_block(c, self.block_queries)
        self.k[:, :, t], self.v[:, :, t] = k[:, :, 0], v[:, :, 0]
        self.block_queries[:, :, offset] = q[:, :, 0]
        self.length = t + 1
        return self._attend_one(q, c, t)

    def _close_block(self, c: int, queries: torch.Tensor) -> None:
        """Block c - 1 is complete (``queries``: its B queries): pool it and the units it
        completes, and route block c."""
        B, br = self.geom.block, self.geom.branching
        self.summary_k[0][:, :, c - 1] = self.k[:, :, (c - 1) * B:c * B].mean(-2)
        self.summary_v[0][:, :, c - 1] = self.v[:, :, (c - 1) * B:c * B].mean(-2)
        unit = c - 1
        for m in range(1, self.levels):
            if (unit + 1) % br:
                break
            unit //= br
            self.summary_k[m][:, :, unit] = self.summary_k[m - 1][:, :, unit * br:(unit + 1) * br].mean(-2)
            self.summary_v[m][:, :, unit] = self.summary_v[m - 1][:, :, unit * br:(unit + 1) * br].mean(-2)
        self.route = None
        if self.routed and c >= 2:  # candidates: blocks 0..c-2; the mean query over the group's heads
            groups = self.k.shape[1]
            mean_q = queries.mean(-2).unflatten(1, (groups, -1)).mean(2)   # [b, g, d]
            scores = (mean_q[:, :, None] @ self.summary_k[0][:, :, :c - 1].transpose(-1, -2))[:, :, 0]
            self.route = scores.topk(min(self.geom.top_k, c - 1), dim=-1).indices

    def _attend_one(self, q: torch.Tensor, c: int, t: int) -> torch.Tensor:
        B, br = self.geom.block, self.geom.branching
        keys, values = [self.k[:, :, c * B:t + 1]], [self.v[:, :, c * B:t + 1]]
        biases = [q.new_zeros(t + 1 - c * B)]
        if self.route is not None:
            b, g = self.k.shape[:2]
            bi = torch.arange(b, device=self.k.device)[:, None, None]
            gi = torch.arange(g, device=self.k.device)[None, :, None]
            for cache, out in ((self.k, keys), (self.v, values)):
                out.append(cache.unflatten(2, (-1, B))[bi, gi, self.route].flatten(2, 3))  # [b, g, kk*B, d]
            biases.append(q.new_zeros(self.route.shape[-1] * B))
        for m in range(self.levels):  # earlier siblings of the level-m unit: a contiguous run
            unit = c // br ** m
            first = unit // br * br
            if unit > first:
                keys.append(self.summary_k[m][:, :, first:unit])
                values.append(self.summary_v[m][:, :, first:unit])
                biases.append(q.new_full((unit - first,), math.log(B) + m * math.log(br)))
        return grouped_attention(q, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(biases))
