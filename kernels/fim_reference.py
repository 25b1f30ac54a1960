"""FIM attention in torch: the blocked path that runs wherever the Triton kernel does not (CPU,
tiles past the kernel's largest), and the dense reference built from the coordinate definitions
(kernels/fim_geometry.py) that tests and `inspect-attention` read the weights of."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fim_geometry import BRANCHES, FimGeometry, pooled_levels, route_blocks, sibling_slots


def fim_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: FimGeometry,
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
        index, valid, level = sibling_slots(nb, geom.branching, geom.levels, q.device)
        keys.append(pooled_levels(kp, B, geom.branching, geom.levels)[:, :, index])
        values.append(pooled_levels(vp, B, geom.branching, geom.levels)[:, :, index])
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
    for j, (m, u, _, _) in enumerate(units):
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
