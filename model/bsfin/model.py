"""BSFIN: byte-level model over entropy patches with a complex-valued interference stack (after
../shared/seeds/bsfin.md), as a causal next-byte language model.

bytes -> entropy patches (data_pipeline/patching.py) -> local encoder (byte + hashed n-gram
embeddings, transformer restricted to each patch, pooled per patch by a learned query) ->
real-to-complex projection, complex positional encoding, complex layer norm -> interference
layers over patches (model/bsfin/complex_layers.py) -> complex-to-real projection (the patch memory)
-> local decoder (causal transformer over bytes, cross-attending to the patch memory) -> logits.

Causality, end to end. A patch's boundaries are decided from the bytes before each boundary
(entropy of a causal predictor, UTF-8 state read from earlier lead bytes), so the end of a patch
is known once its last byte is read. The encoder sees a patch's own bytes (n-gram hashes reach a
few bytes back); the interference stack is causal over patches; the decoder at byte t reads the
memory of the patches complete by t (last byte <= t) and a learned empty slot. So no prediction
uses a later byte (tested by changing byte j).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_pipeline import patching
from kernels.cross_entropy import cross_entropy
from model.bsfin.complex_layers import ComplexLayerNorm, ComplexPositionalEncoding, InterferenceLayer
from model.config import ModelConfig, ParallelConfig

NGRAM_PRIMES = (1_000_003, 998_244_353, 1_000_000_007, 2_147_483_647, 754_974_721)


class LocalBlock(nn.Module):
    """Pre-norm transformer block over bytes; optional cross-attention to a memory."""

    def __init__(self, d: int, heads: int, cross: bool, eps: float, memory_dim: int = 0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm3 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        if cross:
            self.norm2 = nn.LayerNorm(d, eps=eps)
            self.cross_q, self.cross_proj = nn.Linear(d, d), nn.Linear(d, d)
            self.cross_kv = nn.Linear(memory_dim or d, 2 * d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        return x.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, dh = x.shape
        return x.transpose(1, 2).reshape(b, s, h * dh)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, memory: torch.Tensor | None = None,
                memory_allowed: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self._split(t) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        x = x + self.proj(self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])))
        if memory is not None:
            q = self._split(self.cross_q(self.norm2(x)))
            k, v = (self._split(t) for t in self.cross_kv(memory).chunk(2, -1))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_allowed[:, None])
            x = x + self.cross_proj(self._merge(attended))
        return x + self.ffn(self.norm3(x))


class PatchPooling(nn.Module):
    """A learned query per head attends over each patch's bytes (softmax within the patch)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(heads, d // heads) * 0.02)
        self.kv, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, index: torch.Tensor, patches: int) -> torch.Tensor:
        b, s, d = x.shape
        h, dh = self.heads, d // self.heads
        k, v = (t.view(b, s, h, dh) for t in self.kv(x).chunk(2, -1))
        score = (k * self.query).sum(-1) / math.sqrt(dh)                        # [b, s, h]
        idx = index[..., None].expand(-1, -1, h)
        top = score.new_full((b, patches, h), float("-inf")).scatter_reduce(1, idx, score, "amax")
        e = torch.exp(score - top.gather(1, idx))
        weight = e / score.new_zeros(b, patches, h).scatter_add(1, idx, e).gather(1, idx)
        pooled = x.new_zeros(b, patches, h, dh).scatter_add(1, idx[..., None].expand(-1, -1, -1, dh), weight[..., None] * v)
        return self.out(pooled.reshape(b, patches, d))


class BsfinLM(nn.Module):
    """``forward(input_ids, labels)``: per-byte loss ``[b, s]``; without labels: logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size > 512:
            raise ValueError(f"bsfin is byte-level: vocab_size {cfg.vocab_size} (use a bytes dataset, 258 ids)")
        self.cfg, bc = cfg, cfg.bsfin
        d, dc = bc.local_hidden, cfg.hidden_size
        self.rule = patching.PatchRule(bc.threshold, bc.relative, bc.min_patch, bc.max_patch)
        self.byte_embedding = nn.Embedding(cfg.vocab_size, d)
        self.ngram_embeddings = nn.ModuleList(nn.Embedding(bc.ngram_buckets, d) for _ in bc.ngram_sizes)
        self.encoder = nn.ModuleList(LocalBlock(d, bc.local_heads, False, cfg.norm_eps) for _ in range(bc.encoder_layers))
        self.pool = PatchPooling(d, bc.local_heads)
        self.to_complex = nn.Linear(d, 2 * dc)
        self.positions = ComplexPositionalEncoding(dc)
        self.norm_in, self.norm_out = ComplexLayerNorm(dc, cfg.norm_eps), ComplexLayerNorm(dc, cfg.norm_eps)
        self.layers = nn.ModuleList(
            InterferenceLayer(dc, cfg.num_attention_heads, cfg.ffn_hidden_size, bc.score_mode, bc.rope, bc.entangle,
                              cfg.norm_eps) for _ in range(cfg.num_layers))
        m = bc.memory_dim or d
        self.to_real = nn.Linear(2 * dc if bc.complex_to_real == "concat" else dc, m)
        self.empty_memory = nn.Parameter(torch.randn(1, 1, m) * 0.02)   # what a byte reads before any patch ends
        self.decoder_embedding = nn.Embedding(cfg.vocab_size, d)
        self.decoder = nn.ModuleList(LocalBlock(d, bc.local_heads, True, cfg.norm_eps, m) for _ in range(bc.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.entropy_model = None      # set by attach_entropy_model; kept out of parameters and state
        self.last_stats: dict[str, float] = {}

    def pretrained_parts(self) -> dict[str, str]:
        """patching=model: the entropy model's directory, loaded by whoever builds this model."""
        return {"entropy_model": self.cfg.bsfin.entropy_model} if self.cfg.bsfin.patching == "model" else {}

    def attach_pretrained(self, name: str, module: nn.Module, cfg: ModelConfig) -> None:
        if cfg.vocab_size > 512:
            raise ValueError(f"entropy model {self.cfg.bsfin.entropy_model}: vocab_size {cfg.vocab_size} "
                             "is not byte-level")
        self.attach_entropy_model(module)

    def attach_entropy_model(self, model: nn.Module) -> None:
        """The frozen byte LM whose next-byte entropy places the patch boundaries (not trained,
        not saved with this model: the config names its directory)."""
        object.__setattr__(self, "entropy_model", model.eval().requires_grad_(False))

    @torch.no_grad()
    def patches(self, input_ids: torch.Tensor) -> tuple[patching.Patches, torch.Tensor]:
        bc = self.cfg.bsfin
        ids = input_ids.cpu()
        if bc.patching == "model":
            if self.entropy_model is None:
                raise RuntimeError("model.bsfin.patching=model but no entropy model is attached")
            entropy = patching.model_entropy(self.entropy_model(input_ids).cpu())
        else:
            entropy = patching.window_entropy(ids, bc.entropy_window)
        starts = patching.patch_starts(ids, entropy, self.rule)
        found = patching.patches_from_starts(starts)
        return found, starts

    def _ngram_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = 0
        for n, table in zip(self.cfg.bsfin.ngram_sizes, self.ngram_embeddings):
            h = torch.zeros_like(input_ids)
            for back in range(n):   # the n bytes ending at t (zeros before the sequence start)
                prev = F.pad(input_ids, (back, 0))[:, :input_ids.shape[1]]
                h = (h * 257 + prev) % NGRAM_PRIMES[back % len(NGRAM_PRIMES)]
            out = out + table(h % table.num_embeddings)
        return out

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        dev = input_ids.device
        found, _ = self.patches(input_ids)
        index, start, end, complete = (t.to(dev) for t in (found.index, found.start, found.end, found.complete))
        n_patches = start.shape[1]
        positions = torch.arange(s, device=dev)
        # encoder: causal, within a patch
        x = self.byte_embedding(input_ids) + self._ngram_features(input_ids)
        same_patch = (index[:, :, None] == index[:, None, :]) & (positions[None, :, None] >= positions[None, None, :])
        for block in self.encoder:
            x = block(x, same_patch)
        pooled = self.pool(x, index, n_patches)                                   # [b, P, d]
        # interference stack over patches, causal
        z = self.to_complex(pooled).chunk(2, -1)
        z = self.norm_in(self.positions(z))
        patch_pos = torch.arange(n_patches, device=dev)
        causal = (patch_pos[:, None] >= patch_pos[None, :]).expand(b, -1, -1)
        for layer in self.layers:
            z = layer(z, causal)
        z = self.norm_out(z)
        flat = torch.cat(z, -1) if self.cfg.bsfin.complex_to_real == "concat" else torch.sqrt(z[0] ** 2 + z[1] ** 2 + 1e-12)
        memory = torch.cat([self.empty_memory.expand(b, -1, -1), self.to_real(flat)], 1)      # [b, 1 + P, m]
        # decoder: byte t reads the patches complete by t (end <= t + 1) and the empty slot
        visible = complete[:, None, :] & (end[:, None, :] <= positions[None, :, None] + 1)    # [b, s, P]
        visible = torch.cat([visible.new_ones(b, s, 1), visible], -1)
        y = self.decoder_embedding(input_ids)
        causal_bytes = (positions[:, None] >= positions[None, :]).expand(b, -1, -1)
        for block in self.decoder:
            y = block(y, causal_bytes, memory, visible)
        logits = self.head(self.decoder_norm(y))
        if self.training:
            self.last_stats = patching.statistics(found)
        if labels is None:
            return logits
        return cross_entropy(logits, labels)

    def log_metrics(self) -> dict[str, float]:
        """Patch statistics of the last training batch (this rank), for metrics.jsonl."""
        return dict(self.last_stats)


def build(cfg: ModelConfig, par: ParallelConfig) -> BsfinLM:
    model = BsfinLM(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"bsfin: {parameter_count(cfg):,} parameters ({cfg.bsfin.patching} patching, "
              f"{cfg.bsfin.score_mode} interference)", file=sys.stderr, flush=True)
    return model.to(torch.bfloat16) if par.dtype == "bf16" else model


def parameter_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in BsfinLM(cfg).parameters())


def training_flops_per_token(cfg: ModelConfig) -> float:
    """Per byte: 6 x the byte-level matmul parameters (encoder, pooling, decoder, head) + (12 x the
    complex matmul parameters of the patch-level stack (a complex multiply-add is 4 real ones on 2
    real parameters) + 6 x the per-patch real ones) divided by ``flops_patch_bytes`` (an assumed
    mean patch length) + attention
    (bytes: 12 x layers x width x context; patches: the same per patch, complex scores twice)."""
    bc, d, dc, s = cfg.bsfin, cfg.bsfin.local_hidden, cfg.hidden_size, cfg.seq_length
    m = bc.memory_dim or d
    block = 4 * d * d + 8 * d * d
    cross = 2 * d * d                              # per byte: cross-attention query and output
    local = bc.encoder_layers * block + bc.decoder_layers * (block + cross) + 3 * d * d + d * cfg.vocab_size
    complex_ = cfg.num_layers * 2 * (4 * dc * dc + 2 * dc * cfg.ffn_hidden_size)
    # per patch: the bridges in and out, the memory's keys and values in every decoder layer
    bridge = d * 2 * dc + (2 * dc if bc.complex_to_real == "concat" else dc) * m + bc.decoder_layers * 2 * m * d
    patches = s / bc.flops_patch_bytes
    attention = 12.0 * (bc.encoder_layers * d * bc.max_patch + bc.decoder_layers * d * (s + patches))
    attention += 2 * 12.0 * cfg.num_layers * dc * patches / bc.flops_patch_bytes
    return 6.0 * local + (12.0 * complex_ + 6.0 * bridge) / bc.flops_patch_bytes + attention
