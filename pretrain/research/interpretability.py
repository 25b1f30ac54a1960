"""The interpretability proxy of baseline-vs-FIM reports: on passkey prompts, how much of the
attention of the queries that predict the pass key lands on the sentence that states it.

Definition. For one prompt, layer and query head: the mean, over the queries that predict the
answer's tokens, of the attention weight on the needle sentence. Baseline (softmax over the keys
its causal window allows): the weights on the needle's tokens. FIM (its explicit weights over
[tokens; summary units], ``kernels.fim_reference.fim_weights_reference``, what its fast path
computes): the weights on the needle's tokens (local and routed branches) plus each summary
unit's weight times the share of the unit's span inside the needle. A model's proxy is the
largest (layer, head) value, averaged over the prompts: whether some head goes to the needle.
Uniform attention over N keys would give (needle length) / N.

Prompts are at most PROMPT_LIMIT tokens: FIM's explicit weight matrix is N x (N + units) per
head, 0.27 GB per layer at 2k in float64 (4 heads) and 17 GB at 16k.
"""
from __future__ import annotations

import math

import torch

PROMPT_LIMIT = 2048


def needle_mass(model, examples) -> dict:
    """``model``: a MistralLM or FimMistralLM (``core_attentions()`` with ``capture``);
    ``examples``: passkey TaskExamples (``needle`` = (start, end)). Returns the proxy
    and its per-layer values (max over heads, mean over prompts)."""
    cores = model.core_attentions()
    per_layer = [0.0] * len(cores)
    best = []
    for ex in examples:
        for core in cores:
            core.capture = []
        try:
            with torch.no_grad():
                model(torch.tensor(ex.input_ids[None]))
            captured = [core.capture[0] for core in cores]
        finally:
            for core in cores:
                core.capture = None
        start, length = ex.answers[0]
        rows = torch.arange(start - 1, start + length - 1)
        lo, hi = ex.needle
        layer_best = [float(_mass_on(core, q.double(), k.double(), rows, lo, hi).max())
                      for core, (q, k) in zip(cores, captured)]
        best.append(max(layer_best))
        for i, m in enumerate(layer_best):
            per_layer[i] += m / len(examples)
    return {"needle_mass": sum(best) / len(best), "per_layer": per_layer, "prompts": len(examples)}


def _mass_on(core, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per query head: mean over ``rows`` of the attention weight on positions [lo, hi)."""
    n = q.shape[2]
    if hasattr(core, "geometry"):      # FIM
        from kernels.fim_reference import fim_weights_reference

        probs, units, _ = fim_weights_reference(q, k, core.geometry, core.branches)
        probs = probs[0][:, rows]                                   # [heads, rows, N + U]
        mass = probs[..., lo:hi].sum(-1)
        for j, (_, _, u_start, u_end) in enumerate(units):
            overlap = max(0, min(hi, u_end) - max(lo, u_start))
            if overlap:
                mass = mass + probs[..., n + j] * overlap / (u_end - u_start)
        return mass.mean(-1)
    from model.attention import sliding_window_mask

    window = core.sliding_window if 0 < core.sliding_window < n else n
    allowed = sliding_window_mask(n, window, str(q.device))[rows]  # [rows, N]
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[0]
    scores = q[0][:, rows] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs[..., lo:hi].sum(-1).mean(-1)
