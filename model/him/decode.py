"""Incremental decoding for HIM: one token at a time with the same result as the full forward.

Per layer the state holds the attention KV cache (preallocated to ``seq_length``: no copy per
token), the memory of the current chunk with its read keys, and the running sum of this chunk's
memory inputs; per refinement of the reasoning buffer, the buffer of the current chunk with its
read keys and the keys of every earlier token at that layer. When a token opens a new chunk, the
memory takes the finished chunk's write and the buffers are refined over the tokens before the
chunk, exactly as the full forward computes the states of that chunk. What depends only on the
weights (the decoder tokens' keys and values) is computed once per state.

The sinusoidal positions end at ``model.seq_length``: a longer generation restarts the state on
the last half window, new token included (what the full forward computes on those tokens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def initial_state(model, batch: int) -> dict:
    layers = len(model.layers)
    return {"t": 0, "tokens": [], "batch": batch, "kv": [None] * layers,
            "memory": [None] * layers, "memory_keys": [None] * layers, "memory_sum": [None] * layers,
            "buffers": [], "buffer_read_keys": [], "buffer_keys": [], "decoder_kv": None}


def _grouped_attention(attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query position ``x [b, 1, h]`` attending (unmasked) to ``k, v [b, groups, T, d]``.
    The heads sharing a KV group become that group's query rows: GQA without repeating K/V."""
    b, rep = x.shape[0], attn.heads // attn.groups
    q = attn.q(x).view(b, attn.groups, rep, attn.dim)            # head g*rep + r -> group g, row r
    o = F.scaled_dot_product_attention(q, k, v)                  # [b, groups, rep, d]
    return attn.o(o.reshape(b, 1, -1))


def _kv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    return tuple(f(x).view(b, -1, attn.groups, attn.dim).transpose(1, 2) for f in (attn.k, attn.v))


def _self_attend_step(attn, x: torch.Tensor, cache, t: int, capacity: int):
    k, v = _kv(attn, x)
    if cache is None:
        cache = tuple(k.new_empty(k.shape[0], attn.groups, capacity, attn.dim) for _ in range(2))
    cache[0][:, :, t], cache[1][:, :, t] = k[:, :, 0], v[:, :, 0]
    return _grouped_attention(attn, x, cache[0][:, :, :t + 1], cache[1][:, :, :t + 1]), cache


@torch.no_grad()
def step(model, token: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
    cfg, hc = model.cfg, model.cfg.him
    if state["t"] == cfg.seq_length:  # out of positions: restart on the last half window
        keep = state["tokens"][-(cfg.seq_length // 2 - 1):]
        state = initial_state(model, state["batch"])
        for previous in keep:
            _, state = step(model, previous, state)
    t = state["t"]
    new_chunk = t % hc.chunk_size == 0 and t > 0
    x = model.embedding(token)[:, None] * model.embed_scale + model.positions[t]
    refinement = 0
    for i, layer in enumerate(model.layers):
        out, state["kv"][i] = _self_attend_step(layer.attn, layer.attn_norm(x), state["kv"][i], t, cfg.seq_length)
        x = x + out
        n = layer.ffn_norm(x)
        if not hc.cognitive:
            x = x + layer.ffn(n)
            continue
        g = torch.sigmoid(layer.gate(n))
        x = x + g * layer.ffn(n) + (1 - g) * n
        x = x + _memory_step(model.memory, layer, x, state, i, new_chunk)
        if (i + 1) % hc.reasoning_every == 0:
            x = _reasoning_step(model.reasoning, x, state, refinement, new_chunk, cfg.seq_length)
            refinement += 1
    y = model.decoder_norm(x)
    if state["decoder_kv"] is None:
        state["decoder_kv"] = _kv(model.decoder_attn, model.decoder_tokens[None].expand(y.shape[0], -1, -1))
    y = y + _grouped_attention(model.decoder_attn, y, *state["decoder_kv"])
    logits = (F.linear(y, model.embedding.weight) if model.head is None else model.head(y))[:, 0]
    state["t"] = t + 1
    state["tokens"].append(token)
    return logits, state


def _memory_step(memory, layer, x: torch.Tensor, state: dict, i: int, new_chunk: bool) -> torch.Tensor:
    m_in = F.rms_norm(x, (x.shape[-1],))[:, 0]
    if state["memory"][i] is None:
        state["memory"][i] = memory.init.expand(x.shape[0], -1, -1)
        state["memory_keys"][i] = layer.mem_key(state["memory"][i])              # [b, S, r]
        state["memory_sum"][i] = (torch.zeros_like(m_in), 0)
    if new_chunk:
        total, count = state["memory_sum"][i]
        state["memory"][i] = memory.write(state["memory"][i], total / count, layer.mem_key)
        state["memory_keys"][i] = layer.mem_key(state["memory"][i])
        state["memory_sum"][i] = (torch.zeros_like(m_in), 0)
    keys = state["memory_keys"][i]
    attn = torch.softmax(layer.mem_key(m_in)[:, None] @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
    total, count = state["memory_sum"][i]
    state["memory_sum"][i] = (total + m_in, count + 1)
    return layer.mem_out(attn @ keys)


def _reasoning_step(reasoning, x: torch.Tensor, state: dict, j: int, new_chunk: bool, capacity: int) -> torch.Tensor:
    b, t = x.shape[0], state["t"]
    if len(state["buffers"]) <= j:
        state["buffers"].append(reasoning.init.expand(b, -1, -1))
        state["buffer_read_keys"].append(reasoning.down(state["buffers"][j]))
        state["buffer_keys"].append(x.new_empty(b, capacity, reasoning.down.out_features))
    if new_chunk:  # this chunk's buffer: the previous refinement's (or the initial one), refined
        below = state["buffers"][j - 1] if j > 0 else reasoning.init.expand(b, -1, -1)
        state["buffers"][j] = reasoning.refine_one(below, state["buffer_keys"][j][:, :t])
        state["buffer_read_keys"][j] = reasoning.down(state["buffers"][j])
    query = reasoning.down(x)                                                    # [b, 1, r]
    state["buffer_keys"][j][:, t] = query[:, 0]
    keys = state["buffer_read_keys"][j]                                          # [b, T, r]
    attn = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
    return x + reasoning.up(attn @ keys)
