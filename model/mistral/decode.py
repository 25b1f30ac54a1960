"""Incremental decoding for the megatron-core families (Mistral, FIM-Mistral): KV caches.

One step runs the new token through megatron's own modules (embedding, every TransformerLayer,
final norm, output layer) as ``GPTModel.forward`` does, with RoPE at the token's position; each
layer's core attention is lent its cache for the step (``kv_cache``), stores the new keys and
values and attends over the cached ones. An empty cache is filled by a forward over several
tokens at once (the full forward's attention, keys kept), so a restart costs one forward.

Mistral's cache (``WindowCache``) is a rolling buffer of ``model.sliding_window`` keys per layer
(``seq_length`` without a window): a query sees exactly the keys the full forward's sliding-window
mask lets it see. FIM-Mistral's (``model/fim_mistral/decode.py``) also keeps the block summaries
and the routing of the current block.

Positions end at ``model.seq_length``, as in training: a longer generation restarts the caches
on the last half window, new token included (one forward over those tokens, positions from 0), as
HIM does. Every step's logits therefore equal the full forward's over the tokens since the last
restart; the re-run path (`generate` without a cache) instead re-reads the last ``seq_length``
tokens, so past ``seq_length`` the two see different contexts (tested: within ``seq_length``
they are the same computation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attention import causal_attention


@dataclass
class DecodeState:
    tokens: torch.Tensor    # [b, seq_length] long: the tokens the caches hold, the first `length`
    length: int             # positions fed since the last (re)start
    caches: list            # one per layer, lent to its core attention during a step


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query position ``q [b, h, 1, d]`` over ``k, v [b, g, L, d]`` (all visible, plus an
    optional additive ``bias [L]``) -> ``[b, h, 1, d]``. The heads sharing a key/value group
    become that group's query rows (megatron's GQA layout): no repeated keys."""
    b, h, _, d = q.shape
    rows = q.reshape(b, k.shape[1], h // k.shape[1], d)
    mask = None if bias is None else bias.to(q.dtype)[None, None, None, :]
    return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask).reshape(b, h, 1, d)


class WindowCache:
    """One layer's keys and values (after RoPE) as a rolling buffer: position p in slot
    p % capacity. With a window the capacity is the window, so the buffer holds exactly the keys
    the newest query may see (Mistral's i - j < window); attention is order-free, so slots need
    no rotation."""

    def __init__(self, window: int, capacity: int, backend: str = "sdpa"):
        self.window, self.backend = window, backend
        self.capacity = window if 0 < window < capacity else capacity
        self.k = self.v = None
        self.length = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[b, h, s, d]``, k/v ``[b, g, s, d]`` of the next s positions -> ``[b, h, s, d]``."""
        if self.k is None:  # the first tokens: the full forward's attention, keys kept
            out = causal_attention(q, k, v, self.window, self.backend)
            b, g, n, d = k.shape
            self.k, self.v = (k.new_empty(b, g, self.capacity, d) for _ in range(2))
            kept = torch.arange(max(0, n - self.capacity), n)
            self.k[:, :, kept % self.capacity], self.v[:, :, kept % self.capacity] = k[:, :, kept], v[:, :, kept]
            self.length = n
            return out
        if q.shape[2] != 1:
            raise ValueError("a filled KV cache takes one position at a time")
        slot = self.length % self.capacity
        self.k[:, :, slot], self.v[:, :, slot] = k[:, :, 0], v[:, :, 0]
        self.length += 1
        visible = min(self.length, self.capacity)
        return grouped_attention(q, self.k[:, :, :visible], self.v[:, :, :visible])


def initial_state(model, batch: int) -> DecodeState:
    device = next(model.parameters()).device
    return DecodeState(torch.zeros(batch, model.cfg.seq_length, dtype=torch.long, device=device), 0,
                       [model.kv_cache(attention) for attention in model.core_attentions()])


@torch.no_grad()
def step(model, token: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
    """``token [b]`` -> (next-token logits ``[b, vocab]``, the state with the token in it)."""
    n = model.cfg.seq_length
    if state.length == n:  # out of positions: restart on the last half window, new token included
        context = torch.cat([state.tokens[:, n - (n // 2 - 1):], token[:, None]], 1)
        return feed(model, context, initial_state(model, token.shape[0]))
    return feed(model, token[:, None], state)


def feed(model, ids: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
    """``ids [b, s]`` at the next s positions (s > 1 only into empty caches) -> the last
    position's logits ``[b, vocab]``. The same modules and order as ``GPTModel.forward``."""
    gpt, t, s = model.gpt, state.length, ids.shape[1]
    if model.config.tensor_model_parallel_size != 1 or not (gpt.pre_process and gpt.post_process):
        raise ValueError("incremental decoding runs the whole model in one process (tp = pp = 1)")
    positions = torch.arange(t, t + s, device=ids.device)[None]
    hidden = model.embed(ids, positions)
    if hidden is None:
        hidden = gpt.embedding(input_ids=ids, position_ids=positions)
    rope = gpt.rotary_pos_emb(model.cfg.seq_length)[t:t + s]   # [s, 1, 1, d]: positions t..t+s-1
    attentions = model.core_attentions()
    for attention, cache in zip(attentions, state.caches):
        attention.kv_cache = cache
    try:
        hidden = gpt.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    finally:
        for attention in attentions:
            attention.kv_cache = None
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(hidden[-1:], weight=weight)
    state.tokens[:, t:t + s] = ids
    state.length = t + s
    return logits[0], state
