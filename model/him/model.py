"""HIM: a compact decoder with a working memory, a shared reasoning buffer and fast/slow FFN
paths (after ../shared/seeds/him.md), as a causal next-token language model.

Per layer: pre-LayerNorm GQA (sinusoidal positions added to the embedding, as in the design)
and a gated FFN ``x += g * SwiGLU(n) + (1 - g) * n`` (slow path vs identity fast path, ``g`` a
learned per-token gate); then a low-rank read of the shared memory. After every
``reasoning_every``-th layer the shared reasoning buffer is refined and read.

Causality. The design's memory persists across batches and its buffer sees the whole input; a
language model must not let a token see later tokens. Here memory and buffer advance once per
chunk of ``chunk_size`` tokens: the state a token reads was built from earlier chunks only
(memory: a DNC-style erase-then-add write per chunk from the chunk's mean state; buffer: the 64
buffer tokens attend over the tokens of earlier chunks). Both start from learned initial states
for every sequence (no state crosses batches: evaluation and resume stay exact).

Output. The design's decoder maps 64 learned query tokens onto the encoder output (a fixed
64-token response). A next-token model predicts at every position, so the roles swap: every
position cross-attends to 64 learned tokens, then the weight-tied projection gives the logits.
Same parameters (74,560 at the default size).

``cognitive=false`` is the ablation: plain residual SwiGLU, no memory, no buffer.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.cross_entropy import cross_entropy
from model.attention import causal_attention
from model.config import ModelConfig, ParallelConfig

# The design's parameter table (him.md), rows as printed there. Its rows do not add up to its
# total (and 30,000 x 160 is 4,800,000, not 5,120,000); the total is what the tests hold us to.
DESIGN_TABLE = {"embedding": 5_120_000, "attention": 640_000, "ffn": 1_024_000, "memory_interface": 51_200,
                "gates": 1_600, "reasoning": 30_720, "memory": 12_800, "decoder": 74_560, "total": 7_157_680}


def _linear(inp: int, out: int) -> nn.Linear:
    return nn.Linear(inp, out, bias=False)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
    return table


class GQAttention(nn.Module):
    """Grouped-query attention; ``memory`` given: cross-attention to it (no mask)."""

    def __init__(self, h: int, heads: int, groups: int):
        super().__init__()
        self.heads, self.groups, self.dim = heads, groups, h // heads
        self.q, self.k = _linear(h, h), _linear(h, groups * self.dim)
        self.v, self.o = _linear(h, groups * self.dim), _linear(h, h)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        source = x if memory is None else memory.expand(b, -1, -1)
        q = self.q(x).view(b, s, self.heads, self.dim).transpose(1, 2)
        k, v = (f(source).view(b, -1, self.groups, self.dim).transpose(1, 2) for f in (self.k, self.v))
        if memory is None:
            o = causal_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.heads != self.groups)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = _linear(h, f), _linear(h, f), _linear(f, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def chunked(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[b, s, d]`` -> ``[b, K, chunk, d]``, zero-padded at the end."""
    b, s, d = x.shape
    pad = (-s) % chunk
    return F.pad(x, (0, 0, 0, pad)).view(b, -1, chunk, d)


def unchunked(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.flatten(1, 2)[:, :s]


class SharedMemory(nn.Module):
    """Learned initial slots and the erase/add write heads (low rank), shared by all layers."""

    def __init__(self, h: int, slots: int, rank: int):
        super().__init__()
        self.init = nn.Parameter(torch.randn(slots, h) * 0.02)
        self.erase = nn.Sequential(_linear(h, rank), _linear(rank, h))
        self.add = nn.Sequential(_linear(h, rank), _linear(rank, h))

    def states(self, summaries: torch.Tensor, key: nn.Linear) -> torch.Tensor:
        """Memory before each chunk ``[b, K, slots, h]`` from chunk summaries ``[b, K, h]``:
        chunk k sees the writes of chunks < k (erase-then-add, addressed by ``key``)."""
        b, chunks, _ = summaries.shape
        memory = self.init.expand(b, -1, -1)
        out = [memory]
        for k in range(chunks - 1):
            memory = self.write(memory, summaries[:, k], key)
            out.append(memory)
        return torch.stack(out, dim=1)

    def write(self, memory: torch.Tensor, s: torch.Tensor, key: nn.Linear) -> torch.Tensor:
        """One erase-then-add write of summary ``s [b, h]`` into ``memory [b, slots, h]``."""
        weight = torch.softmax(key(memory) @ key(s)[:, :, None] / math.sqrt(key.out_features), dim=1)
        erase, add = torch.sigmoid(self.erase(s))[:, None], torch.tanh(self.add(s))[:, None]
        return memory * (1 - weight * erase) + weight * add


class HimBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hc = cfg.hidden_size, cfg.him
        self.attn_norm, self.ffn_norm = nn.LayerNorm(h, eps=cfg.norm_eps), nn.LayerNorm(h, eps=cfg.norm_eps)
        self.attn = GQAttention(h, cfg.num_attention_heads, cfg.num_query_groups)
        self.ffn = SwiGLU(h, cfg.ffn_hidden_size)
        self.cognitive, self.chunk = hc.cognitive, hc.chunk_size
        if self.cognitive:
            self.gate = _linear(h, 1)                       # slow-path share per token
            self.mem_key, self.mem_out = _linear(h, hc.memory_rank), _linear(hc.memory_rank, h)

    def forward(self, x: torch.Tensor, memory: SharedMemory | None, stats: dict) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        n = self.ffn_norm(x)
        if not self.cognitive:
            return x + self.ffn(n)
        g = torch.sigmoid(self.gate(n))
        x = x + g * self.ffn(n) + (1 - g) * n
        stats["gates"].append(g.mean())
        return x + self._read_memory(x, memory, stats)

    def _read_memory(self, x: torch.Tensor, memory: SharedMemory, stats: dict) -> torch.Tensor:
        s = x.shape[1]
        m_in = F.rms_norm(x, (x.shape[-1],))
        parts = chunked(m_in, self.chunk)                                    # [b, K, C, h]
        counts = chunked(torch.ones_like(m_in[..., :1]), self.chunk).sum(2).clamp(min=1)
        states = memory.states(parts.sum(2) / counts, self.mem_key)          # [b, K, S, h]
        keys = self.mem_key(states)                                          # [b, K, S, r]
        attn = torch.softmax(self.mem_key(parts) @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
        slots = attn.shape[-1]
        entropy = -(attn * attn.clamp_min(1e-9).log()).sum(-1).mean() / math.log(slots)
        stats["memory_entropy"].append(entropy)
        stats["memory_used"].append((attn.detach().mean(2) > 0.5 / slots).float().mean())
        return unchunked(self.mem_out(attn @ keys), s)


class ReasoningBuffer(nn.Module):
    """The shared scratchpad: learned initial tokens, low-rank projections for refine and read."""

    def __init__(self, h: int, tokens: int, momentum: float, chunk: int):
        super().__init__()
        self.init = nn.Parameter(torch.randn(tokens, h) * 0.02)
        self.down, self.up = _linear(h, tokens), _linear(tokens, h)
        self.momentum, self.chunk = momentum, chunk

    def initial(self, b: int, chunks: int) -> torch.Tensor:
        return self.init.expand(b, chunks, -1, -1)

    def refine(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``buffer [b, K, T, h]`` (one per chunk) attends over the tokens of earlier chunks of
        ``x``; moving average with the refined buffer. Chunk 0 has nothing before it: unchanged."""
        b, chunks, _, _ = buffer.shape
        s = x.shape[1]
        keys = self.down(x)                                                   # [b, s, r]
        scores = self.down(buffer) @ keys[:, None].transpose(-1, -2) / math.sqrt(keys.shape[-1])
        starts = torch.arange(chunks, device=x.device) * self.chunk
        visible = torch.arange(s, device=x.device)[None, :] < starts[:, None]  # [K, s]
        scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
        any_visible = visible.any(-1)[None, :, None, None]
        attn = torch.softmax(scores.masked_fill(~any_visible, 0.0), -1) * any_visible
        refined = buffer + self.up(attn @ keys[:, None])
        return self.momentum * buffer + (1 - self.momentum) * refined

    def refine_one(self, buffer: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One chunk's buffer ``[b, T, h]`` refined over the keys ``[b, t, r]`` of every token
        before the chunk (``refine`` for a single chunk; no tokens: unchanged)."""
        if keys.shape[1] == 0:
            return buffer
        attn = torch.softmax(self.down(buffer) @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
        return self.momentum * buffer + (1 - self.momentum) * (buffer + self.up(attn @ keys))

    def read(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        keys = self.down(buffer)                                              # [b, K, T, r]
        q = chunked(self.down(x), self.chunk)                                 # [b, K, C, r]
        attn = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), -1)
        return unchunked(self.up(attn @ keys), x.shape[1])


class HimLM(nn.Module):
    """``forward(input_ids, labels)``: per-token loss ``[b, s]`` (training: plus the weighted
    auxiliary losses, spread over tokens), or logits without labels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hc = cfg.hidden_size, cfg.him
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, h)
        nn.init.normal_(self.embedding.weight, std=cfg.init_std)
        self.register_buffer("positions", sinusoidal_positions(cfg.seq_length, h), persistent=False)
        # Vaswani et al.'s sqrt(h) on the (tied, std 0.02) embedding: unscaled, the unit-amplitude
        # positions swamp the tokens and training stalls near the unigram loss (measured)
        self.embed_scale = math.sqrt(h)
        self.layers = nn.ModuleList(HimBlock(cfg) for _ in range(cfg.num_layers))
        if hc.cognitive:
            self.memory = SharedMemory(h, hc.memory_slots, hc.memory_rank)
            self.reasoning = ReasoningBuffer(h, hc.reasoning_tokens, hc.reasoning_momentum, hc.chunk_size)
        self.decoder_tokens = nn.Parameter(torch.randn(hc.decoder_tokens, h) * 0.02)
        self.decoder_norm = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.decoder_attn = GQAttention(h, cfg.num_attention_heads, cfg.num_query_groups)
        self.last_stats: dict[str, float] = {}
        self.head: nn.Linear | None = None     # an untied copy of the output projection (untie_head)

    def untie_head(self) -> None:
        """A Linear copy of the tied output projection, for inference (int8 quantization)."""
        self.head = _linear(self.cfg.hidden_size, self.cfg.vocab_size)
        self.head.weight = nn.Parameter(self.embedding.weight.detach().clone())

    def hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        s = input_ids.shape[1]
        x = self.embedding(input_ids) * self.embed_scale + self.positions[:s]
        stats = {"gates": [], "memory_entropy": [], "memory_used": [], "buffer_change": []}
        buffer = None
        for i, layer in enumerate(self.layers):
            x = layer(x, getattr(self, "memory", None), stats)
            if self.cfg.him.cognitive and (i + 1) % self.cfg.him.reasoning_every == 0:
                if buffer is None:
                    buffer = self.reasoning.initial(x.shape[0], -(-s // self.cfg.him.chunk_size))
                new = self.reasoning.refine(buffer, x)
                stats["buffer_change"].append(((new - buffer).norm() / buffer.norm()).detach())
                buffer = new
                x = x + self.reasoning.read(buffer, x)
        stats["buffer"] = buffer
        y = self.decoder_norm(x)
        return y + self.decoder_attn(y, self.decoder_tokens[None]), stats

    def initial_state(self, batch: int) -> dict:
        from model.him.decode import initial_state
        return initial_state(self, batch)

    def step(self, token: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Next-token logits ``[b, V]`` after ``token [b]``, with KV caches and chunk states:
        O(context) per token instead of re-running the window (model/him/decode.py)."""
        from model.him.decode import step
        return step(self, token, state)

    def aux_losses(self, stats: dict) -> dict[str, torch.Tensor]:
        """Memory sparsity (read entropy, normalized), reasoning diversity (mean squared cosine
        between distinct buffer tokens), routing balance (each layer's slow share vs 1/2)."""
        if not self.cfg.him.cognitive:
            return {}
        out = {"memory_sparsity": torch.stack(stats["memory_entropy"]).mean(),
               "routing_balance": torch.stack([(g - 0.5) ** 2 for g in stats["gates"]]).mean()}
        if stats["buffer"] is not None:
            unit = F.normalize(stats["buffer"], dim=-1)
            gram = unit @ unit.transpose(-1, -2)
            tokens = gram.shape[-1]
            off = gram - torch.eye(tokens, device=gram.device)
            out["reasoning_diversity"] = off.square().sum((-1, -2)).mean() / (tokens * (tokens - 1))
        return out

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y, stats = self.hidden(input_ids)
        logits = F.linear(y, self.embedding.weight) if self.head is None else self.head(y)
        if labels is None:
            return logits
        loss = cross_entropy(logits, labels)
        if not self.training:
            return loss
        aux = self.aux_losses(stats)
        hc = self.cfg.him
        weights = {"memory_sparsity": hc.memory_sparsity_weight, "reasoning_diversity": hc.reasoning_diversity_weight,
                   "routing_balance": hc.routing_balance_weight}
        self._record(stats, aux)
        return loss + sum(weights[k] * v for k, v in aux.items())

    def _record(self, stats: dict, aux: dict) -> None:
        record = {f"aux_{k}": float(v.detach()) for k, v in aux.items()}
        if self.cfg.him.cognitive:
            record["memory_utilization"] = float(torch.stack(stats["memory_used"]).mean())
            if stats["buffer_change"]:
                record["reasoning_buffer_change"] = float(torch.stack(stats["buffer_change"]).mean())
            record.update({f"slow_share_layer{i}": float(g.detach()) for i, g in enumerate(stats["gates"])})
        self.last_stats = record

    def log_metrics(self) -> dict[str, float]:
        """Cognitive metrics of the last training step (this rank), for metrics.jsonl."""
        return dict(self.last_stats)

    def speed_groups(self) -> dict[str, str]:
        """Parameter name -> the design's learning-rate group: slow (attention, slow FFN path),
        fast (gates), cognitive (memory, reasoning buffer), standard (the rest)."""
        groups = {}
        for name, _ in self.named_parameters():
            if ".attn." in name or ".ffn." in name:
                groups[name] = "slow"
            elif name.endswith(".gate.weight"):
                groups[name] = "fast"
            elif name.startswith(("memory.", "reasoning.")) or ".mem_" in name:
                groups[name] = "cognitive"
            else:
                groups[name] = "standard"
        return groups


def component_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per design-table row, in closed form."""
    h, f, L, hc, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.him, cfg.vocab_size
    kv = cfg.num_query_groups * (h // cfg.num_attention_heads)
    attention = 2 * h * h + 2 * h * kv
    cog = hc.cognitive
    counts = {"embedding": v * h, "attention": L * attention, "ffn": L * 3 * h * f,
              "norms": L * 4 * h,
              "memory_interface": L * 2 * h * hc.memory_rank if cog else 0, "gates": L * h if cog else 0,
              "reasoning": (hc.reasoning_tokens * h + 2 * h * hc.reasoning_tokens) if cog else 0,
              "memory": (hc.memory_slots * h + 4 * h * hc.memory_rank) if cog else 0,
              "decoder": hc.decoder_tokens * h + attention + 2 * h}
    counts["total"] = sum(counts.values())
    return counts


def parameter_table(cfg: ModelConfig) -> str:
    ours = component_counts(cfg)
    lines = [f"{'HIM component':<18}{'ours':>12}{'design':>12}", "-" * 42]
    for row, value in ours.items():
        design = DESIGN_TABLE.get(row)
        lines.append(f"{row:<18}{value:>12,}{'' if design is None else format(design, ','):>12}")
    total, design = ours["total"], DESIGN_TABLE["total"]
    lines.append(f"total vs the design's {design:,} (its default size): {100 * (total - design) / design:+.2f}% "
                 "(the design's rows do not sum to its total; ours: SwiGLU has 3 matrices, norms are LayerNorm)")
    return "\n".join(lines)


def build(cfg: ModelConfig, par: ParallelConfig) -> HimLM:
    model = HimLM(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(parameter_table(cfg), file=sys.stderr, flush=True)
    return model.to(torch.bfloat16) if par.dtype == "bf16" else model


def parameter_count(cfg: ModelConfig) -> int:
    return component_counts(cfg)["total"]


def training_flops_per_token(cfg: ModelConfig) -> float:
    """6 x the parameters used in matmuls per token (all but the embedding lookup and the learned
    initial states; the tied head counts) + 12 x layers x hidden x context for causal attention.
    The chunk-level memory and buffer attention (a few percent at the default size) is left out."""
    c = component_counts(cfg)
    hc = cfg.him
    states = (hc.memory_slots + hc.reasoning_tokens) * cfg.hidden_size if hc.cognitive else 0
    matmul = c["total"] - c["norms"] - states - hc.decoder_tokens * cfg.hidden_size
    return 6.0 * matmul + 12.0 * cfg.num_layers * cfg.hidden_size * cfg.seq_length
