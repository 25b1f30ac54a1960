"""FIM attention: causal attention over a b-ary hierarchy of token blocks ("fractal coordinates").

Position p has leaf block c = p // B; at level m >= 0 the unit of size B * b^m holding p is
p // (B * b^m), its parent is that index // b. A query in leaf block c attends, in one softmax:

1. **local**: exactly, to the earlier-or-equal tokens of its own leaf block;
2. **hierarchical**: to the mean-pooled key/value summaries of the earlier siblings of its unit
   at every level m (units of size B * b^m that share its parent), at most b - 1 per level. Their
   union tiles the whole past before the leaf block, coarser the further back it lies, so a query
   sees B + (b - 1) * levels keys: O(N log N) work for N tokens. A summary of S tokens gets a
   +log(S) score bias: exp(q.k_mean + log S) = S exp(q.k_mean) stands for the S tokens it pools
   (Jensen's lower bound of their summed weights), so a far summary competes fairly with exact keys;
3. **routed**: exactly, to the tokens of the top-k earlier leaf blocks, chosen per key/value
   group by the score of the preceding leaf block's mean query (over the group's query heads)
   against each block's mean key. One decision per
   block keeps routing at (N/B)^2 dot products; taking the query from the *preceding* block keeps
   it causal (a block's own mean query would see its future tokens). Candidates are blocks
   0..c-2; the selection is discrete and not differentiated (gradients flow through the
   attention to the chosen tokens, not through the choice).

Branches share one softmax (rather than a learned gate), so the attention mass per branch is
directly readable for interpretability. GQA: key/value heads are shared by groups of query heads,
and so are the routed blocks (gathered once per group).

This file holds the geometry (routing, sibling slots, pooled summaries) that every
implementation shares: ``kernels/fim_reference.py`` the blocked torch path (per leaf block, B local
+ k*B routed + summaries; never an N x N matrix) and the dense reference built from the coordinate
definitions (for tests and for inspecting attention), ``kernels/fim_attention.py`` the Triton
kernel and the dispatcher that model code calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BRANCHES = ("local", "hierarchical", "routed")   # the config's choices (model.fim.branches) too


@dataclass(frozen=True)
class FimGeometry:
    block: int          # B: leaf block size
    branching: int      # b
    levels: int         # hierarchical levels (0: none)
    top_k: int          # routed blocks per query block (0: none)

    @staticmethod
    def auto_levels(seq_length: int, block: int, branching: int) -> int:
        """Levels whose top unit covers seq_length: ceil(log_b(ceil(N / B)))."""
        blocks, levels = -(-seq_length // block), 0
        while branching ** levels < blocks:
            levels += 1
        return levels


def route_blocks(q: torch.Tensor, k: torch.Tensor, block: int, top_k: int):
    """Per key/value group, the top-k earlier leaf blocks for each query block.

    q ``[b, h, N, d]``, k ``[b, g, N, d]`` -> (indices ``[b, g, nb, top_k]`` long,
    valid ``[nb, top_k]`` bool). Block c routes with the mean query of block c - 1 (averaged
    over the group's query heads) against the mean keys of blocks 0..c-2; slots beyond the
    available candidates are invalid."""
    bsz, heads, n, d = q.shape
    groups = k.shape[1]
    nb = -(-n // block)
    with torch.no_grad():
        qm = block_means(q, block)[:, :, : nb - 1]                       # sources: blocks 0..nb-2
        qm = qm.unflatten(1, (groups, heads // groups)).mean(2)            # [b, g, nb-1, d]
        scores = qm @ block_means(k, block).transpose(-1, -2)              # [b, g, nb-1, nb]
        source = torch.arange(nb - 1, device=q.device)[:, None]
        candidate = torch.arange(nb, device=q.device)[None, :] < source    # u <= c-2, c = source+1
        scores = scores.masked_fill(~candidate, float("-inf"))
        k_eff = min(top_k, nb)
        idx = scores.topk(k_eff, dim=-1).indices if nb > 1 else scores.new_zeros(
            bsz, groups, 0, k_eff, dtype=torch.long)
        idx = F.pad(idx, (0, 0, 1, 0))                                      # block 0 routes nowhere
        slots = torch.arange(k_eff, device=q.device)[None, :]
        valid = slots < (torch.arange(nb, device=q.device)[:, None] - 1).clamp(min=0)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
    return idx, valid


def block_means(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., N, d]`` -> means over consecutive runs of ``size`` rows (last run zero-padded)."""
    n = x.shape[-2]
    pad = -n % size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (-1, size)).mean(-2)


def sibling_slots(nb: int, branching: int, levels: int, device) -> tuple[torch.Tensor, ...]:
    """For each leaf block, the earlier siblings at every level, as indices into the
    concatenation of all levels' units: (index ``[nb, S]``, valid ``[nb, S]``, log-span
    ``[S]``) with S = levels * (branching - 1)."""
    c = torch.arange(nb, device=device)
    index, valid, spans, offset, units = [], [], [], 0, nb
    r = torch.arange(branching - 1, device=device)[None, :]
    for m in range(levels):
        u = c // branching ** m
        ok = r < (u % branching)[:, None]
        index.append(torch.where(ok, offset + (u // branching * branching)[:, None] + r, 0))
        valid.append(ok)
        spans.append(torch.full((branching - 1,), float(m), device=device))
        offset += units
        units = -(-units // branching)
    if not index:
        empty = torch.zeros(nb, 0, dtype=torch.long, device=device)
        return empty, empty.bool(), torch.zeros(0, device=device)
    return torch.cat(index, 1), torch.cat(valid, 1), torch.cat(spans)


def pooled_levels(x: torch.Tensor, block: int, branching: int, levels: int) -> torch.Tensor:
    """Means of units at levels 0..levels-1, concatenated along the sequence dim. A complete
    unit's mean is the mean of its children's means; incomplete units are never visible."""
    out, cur = [], block_means(x, block)
    for _ in range(levels):
        out.append(cur)
        cur = block_means(cur, branching)
    return torch.cat(out, dim=-2)
