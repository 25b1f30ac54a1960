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

``fim_attention`` is the fast path (blocked: per leaf block, B local + k*B routed + summaries;
never an N x N matrix); ``fim_attention_reference`` builds the equivalent dense N x (N + units)
weights explicitly from the coordinate definitions, for tests and for inspecting attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import FIM_BRANCHES as BRANCHES  # one list: config and attention


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
        qm = _block_means(q, block)[:, :, : nb - 1]                       # sources: blocks 0..nb-2
        qm = qm.unflatten(1, (groups, heads // groups)).mean(2)            # [b, g, nb-1, d]
        scores = qm @ _block_means(k, block).transpose(-1, -2)              # [b, g, nb-1, nb]
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


def _block_means(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., N, d]`` -> means over consecutive runs of ``size`` rows (last run zero-padded)."""
    n = x.shape[-2]
    pad = -n % size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (-1, size)).mean(-2)


def _sibling_slots(nb: int, branching: int, levels: int, device) -> tuple[torch.Tensor, ...]:
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


def _pooled_levels(x: torch.Tensor, block: int, branching: int, levels: int) -> torch.Tensor:
    """Means of units at levels 0..levels-1, concatenated along the sequence dim. A complete
    unit's mean is the mean of its children's means; incomplete units are never visible."""
    out, cur = [], _block_means(x, block)
    for m in range(levels):
        out.append(cur)
        cur = _block_means(cur, branching)
    return torch.cat(out, dim=-2)


def fim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: FimGeometry,
                  branches: tuple[str, ...] = BRANCHES) -> torch.Tensor:
    """q ``[b, h, N, d]``, k/v ``[b, g, N, d]`` -> ``[b, h, N, d]``; blocked, O(N (B + kB + S)).

    Keys and values are gathered once per (key/value group, leaf block); the group's query heads
    are stacked along the query axis of one SDPA call (rows of attention are independent), so
    nothing is repeated per query head. Leaf blocks are SDPA's head dim and (batch, group) its
    batch: a 4-D call whose mask broadcasts over the batch takes PyTorch's fused kernel."""
    bsz, heads, n, d = q.shape
    groups = k.shape[1]
    B, rep = geom.block, heads // groups
    nb = -(-n // B)
    pad = nb * B - n
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    # [b, g*rep, nb*B, d] -> [b*g, nb, rep*B, d]
    qb = qp.view(bsz, groups, rep, nb, B, d).transpose(2, 3).reshape(bsz * groups, nb, rep * B, d)
    kb, vb = kp.unflatten(2, (nb, B)), vp.unflatten(2, (nb, B))               # [b, g, nb, B, d]
    keys, values = [kb], [vb]
    pos = torch.arange(B, device=q.device)
    biases = [torch.zeros(nb, B, B, device=q.device).masked_fill(pos[None, :] > pos[:, None],
                                                                float("-inf"))]
    if "routed" in branches and geom.top_k > 0 and nb > 1:
        idx, valid = route_blocks(q, k, B, geom.top_k)                      # [b, g, nb, kk]
        bi = torch.arange(bsz, device=q.device)[:, None, None, None]
        gi = torch.arange(groups, device=q.device)[None, :, None, None]
        keys.append(kb[bi, gi, idx].flatten(3, 4))                          # [b, g, nb, kk*B, d]
        values.append(vb[bi, gi, idx].flatten(3, 4))
        routed = torch.zeros(valid.shape, device=q.device).masked_fill(~valid, float("-inf"))
        biases.append(routed.repeat_interleave(B, 1)[:, None, :].expand(nb, B, -1))
    if "hierarchical" in branches and geom.levels > 0:
        index, valid, level = _sibling_slots(nb, geom.branching, geom.levels, q.device)
        keys.append(_pooled_levels(kp, B, geom.branching, geom.levels)[:, :, index])
        values.append(_pooled_levels(vp, B, geom.branching, geom.levels)[:, :, index])
        log_span = math.log(B) + level * math.log(geom.branching)
        summary = log_span[None, :].expand(nb, -1).masked_fill(~valid, float("-inf"))
        biases.append(summary[:, None, :].expand(nb, B, -1))
    bias = torch.cat(biases, dim=-1).to(q.dtype).repeat(1, rep, 1)[None]   # [1, nb, rep*B, Kc]
    out = F.scaled_dot_product_attention(qb, torch.cat(keys, 3).flatten(0, 1),
                                         torch.cat(values, 3).flatten(0, 1), attn_mask=bias)
    out = out.view(bsz, groups, nb, rep, B, d).transpose(2, 3).reshape(bsz, heads, nb * B, d)
    return out[:, :, :n]


def fim_weights_reference(q: torch.Tensor, k: torch.Tensor, geom: FimGeometry,
                          branches: tuple[str, ...] = BRANCHES):
    """Dense attention weights over [N tokens; all summary units] built from the coordinate
    definitions: (probabilities ``[b, h, N, N + U]``, unit table ``[(level, index, start, end)]``,
    branch of each (query, key) ``[b, h, N, N + U]`` as 0 none / 1 local / 2 routed / 3 summary)."""
    bsz, heads, n, d = q.shape
    B, b = geom.block, geom.branching
    units = []
    for m in range(geom.levels if "hierarchical" in branches else 0):
        span = B * b ** m
        units += [(m, u, u * span, min((u + 1) * span, n)) for u in range(-(-n // span))]
    branch = torch.zeros(bsz, heads, n, n + len(units), dtype=torch.long)
    pos = torch.arange(n)
    same_block = (pos[:, None] // B == pos[None, :] // B) & (pos[None, :] <= pos[:, None])
    branch[..., :n][:, :, same_block] = 1
    if "routed" in branches and geom.top_k > 0 and -(-n // B) > 1:
        idx, valid = route_blocks(q, k, B, geom.top_k)
        for i in range(n):
            c = i // B
            for s in range(idx.shape[-1]):
                if valid[c, s]:
                    for bb in range(bsz):
                        for h in range(heads):
                            u = int(idx[bb, h // (heads // k.shape[1]), c, s])
                            branch[bb, h, i, u * B:(u + 1) * B] = 2
    bias = torch.zeros(n + len(units))
    for j, (m, u, start, end) in enumerate(units):
        bias[n + j] = math.log(B * b ** m)
        for i in range(n):
            own = i // (B * b ** m)
            if u // b == own // b and u < own:      # an earlier sibling at level m
                branch[:, :, i, n + j] = 3
    scores = q @ _expand(_with_units(k, units), heads).transpose(-1, -2) / math.sqrt(d) + bias
    probs = torch.softmax(scores.masked_fill(branch == 0, float("-inf")), dim=-1)
    return probs, units, branch


def fim_attention_reference(q, k, v, geom: FimGeometry, branches=BRANCHES) -> torch.Tensor:
    probs, units, _ = fim_weights_reference(q, k, geom, branches)
    return probs @ _expand(_with_units(v, units), q.shape[1])


def _with_units(x: torch.Tensor, units) -> torch.Tensor:
    """Tokens followed by the mean of each unit's tokens."""
    pooled = [x[:, :, start:end].mean(2, keepdim=True) for _, _, start, end in units]
    return torch.cat([x, *pooled], dim=2)


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)
