"""Incremental decoding for HIM: one token at a time with the same result as the full forward.

Per layer the state holds the attention KV cache, the memory of the current chunk and the
running sum of this chunk's memory inputs; per refinement of the reasoning buffer, the buffer of
the current chunk and the keys of every earlier token at that layer. When a token opens a new
chunk, the memory takes the finished chunk's write and the buffers are refined over the tokens
before the chunk, exactly as the full forward computes the states of that chunk.

The sinusoidal positions end at ``model.seq_length``: a longer generation restarts the state
from the last half window (the full forward's sliding window re-runs the last seq_length).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def initial_state(model, batch: int) -> dict:
    return {"t": 0, "tokens": [], "batch": batch,
            "kv": [None] * len(model.layers),
            "memory": [None] * len(model.layers), "memory_sum": [None] * len(model.layers),
            "buffers": [], "buffer_keys": []}


def _attend_step(attn, x: torch.Tensor, cache):
    b = x.shape[0]
    q = attn.q(x).view(b, 1, attn.heads, attn.dim).transpose(1, 2)
    k, v = (f(x).view(b, 1, attn.groups, attn.dim).transpose(1, 2) for f in (attn.k, attn.v))
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    rep = attn.heads // attn.groups
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    return attn.o(o.transpose(1, 2).reshape(b, 1, -1)), (k, v)


@torch.no_grad()
def step(model, token: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
    cfg, hc = model.cfg, model.cfg.him
    if state["t"] == cfg.seq_length:  # out of positions: restart from the last half window
        keep = state["tokens"][-(cfg.seq_length // 2):]
        state = initial_state(model, state["batch"])
        for previous in keep[:-1]:
            _, state = step(model, previous, state)
        token = keep[-1]
    t = state["t"]
    new_chunk = t % hc.chunk_size == 0 and t > 0
    x = model.embedding(token)[:, None] * model.embed_scale + model.positions[t]
    refinement = 0
    for i, layer in enumerate(model.layers):
        out, state["kv"][i] = _attend_step(layer.attn, layer.attn_norm(x), state["kv"][i])
        x = x + out
        n = layer.ffn_norm(x)
        if not hc.cognitive:
            x = x + layer.ffn(n)
            continue
        g = torch.sigmoid(layer.gate(n))
        x = x + g * layer.ffn(n) + (1 - g) * n
        m_in = F.rms_norm(x, (x.shape[-1],))[:, 0]
        if state["memory"][i] is None:
            state["memory"][i] = model.memory.init.expand(x.shape[0], -1, -1)
            state["memory_sum"][i] = (torch.zeros_like(m_in), 0)
        if new_chunk:
            total, count = state["memory_sum"][i]
            state["memory"][i] = model.memory.write(state["memory"][i], total / count, layer.mem_key)
            state["memory_sum"][i] = (torch.zeros_like(m_in), 0)
        keys = layer.mem_key(state["memory"][i])                                 # [b, S, r]
        attn = torch.softmax(layer.mem_key(m_in)[:, None] @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
        x = x + layer.mem_out(attn @ keys)
        total, count = state["memory_sum"][i]
        state["memory_sum"][i] = (total + m_in, count + 1)
        if (i + 1) % hc.reasoning_every == 0:
            x = _reasoning_step(model.reasoning, x, state, refinement, new_chunk)
            refinement += 1
    y = model.decoder_norm(x)
    y = y + model.decoder_attn(y, model.decoder_tokens[None])
    logits = (F.linear(y, model.embedding.weight) if model.head is None else model.head(y))[:, 0]
    state["t"] = t + 1
    state["tokens"].append(token)
    return logits, state


def _reasoning_step(reasoning, x: torch.Tensor, state: dict, j: int, new_chunk: bool) -> torch.Tensor:
    b = x.shape[0]
    if len(state["buffers"]) <= j:
        state["buffers"].append(reasoning.init.expand(b, -1, -1))
        state["buffer_keys"].append(x.new_zeros(b, 0, reasoning.down.out_features))
    if new_chunk:  # this chunk's buffer: the previous refinement's (or the initial one), refined
        below = state["buffers"][j - 1] if j > 0 else reasoning.init.expand(b, -1, -1)
        state["buffers"][j] = reasoning.refine_one(below, state["buffer_keys"][j])
    state["buffer_keys"][j] = torch.cat([state["buffer_keys"][j], reasoning.down(x)], 1)
    buffer = state["buffers"][j]
    keys = reasoning.down(buffer)                                                # [b, T, r]
    attn = torch.softmax(reasoning.down(x) @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
    return x + reasoning.up(attn @ keys)
