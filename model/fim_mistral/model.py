"""FIM-Mistral: the Mistral baseline with FIM attention (kernels/fim_geometry.py) as its core
attention, per-layer FIM settings, and an optional learned position embedding per level of the
fractal coordinate (beside RoPE). Everything else (RMSNorm, SwiGLU, GQA, TP/PP/ZeRO) is the
baseline's, so a comparison isolates the attention.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.fim_attention import fim_attention  # Triton on CUDA, the blocked torch path elsewhere
from kernels.fim_geometry import FimGeometry
from model.config import ModelConfig, ParallelConfig
from model.fim_mistral.config import FimConfig
from model.fim_mistral.decode import FimCache
from model.mistral import model as mistral


def layer_geometry(fim: FimConfig, index: int | None, seq_length: int) -> tuple[FimGeometry, tuple]:
    """(geometry, branches) of layer ``index`` (0-based; None: the model-wide settings)."""
    layer = fim.for_layer(index)
    levels = layer.levels if layer.levels >= 0 else FimGeometry.auto_levels(
        seq_length, layer.block_size, layer.branching)
    return (FimGeometry(layer.block_size, layer.branching, levels, layer.top_k),
            tuple(layer.branches.split(",")))


class FimCoreAttention(nn.Module):
    """Megatron core attention: q ``[s, b, heads/tp, d]``, k/v ``[s, b, groups/tp, d]`` after
    RoPE -> ``[s, b, heads/tp * d]``. Every operation is per head, so TP needs nothing more.
    ``capture`` (a list, set by `inspect-attention`) receives this layer's q and k."""

    def __init__(self, config, layer_number: int = 1, attn_mask_type=None, attention_type=None,
                 *, fim: FimConfig, seq_length: int, **kwargs):
        super().__init__()
        self.config = config
        self.layer_index = layer_number - 1      # megatron numbers layers from 1, globally
        self.geometry, self.branches = layer_geometry(fim, self.layer_index, seq_length)
        self.capture: list | None = None
        self.kv_cache = None  # lent for one step by incremental decoding (model/fim_mistral/decode.py)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("FIM attention does not take a document mask (data.mask_documents)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, n, s, d]
        if self.capture is not None:
            self.capture.append((q.detach(), k.detach()))
        if self.kv_cache is not None:
            out = self.kv_cache.attend(q, k, v)
        else:
            out = fim_attention(q, k, v, self.geometry, self.branches)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class FractalPositionEmbedding(nn.Module):
    """Position p -> E_leaf[p mod B] + sum over levels m of E_m[(p // (B b^m)) mod b]: a learned
    absolute position factorized along the hierarchy FIM attention uses."""

    @staticmethod
    def shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(leaf table, level tables): also the closed-form parameter count's source."""
        geom, _ = layer_geometry(cfg.fim, None, cfg.seq_length)
        return (geom.block, cfg.hidden_size), (max(geom.levels, 1), geom.branching, cfg.hidden_size)

    def __init__(self, cfg: ModelConfig, init_seed: int):
        super().__init__()
        geom, _ = layer_geometry(cfg.fim, None, cfg.seq_length)
        self.block, self.branching, self.levels = geom.block, geom.branching, geom.levels
        leaf, level = self.shapes(cfg)
        self.leaf, self.level = nn.Parameter(torch.empty(leaf)), nn.Parameter(torch.empty(level))
        # Seeded on its own: the same weights whatever else this pipeline stage builds.
        g = torch.Generator().manual_seed((init_seed * 7919 + 17) % 2**63)
        with torch.no_grad():
            for p in (self.leaf, self.level):
                p.copy_(torch.randn(p.shape, generator=g) * cfg.init_std)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions ``[..., s]`` -> ``[..., s, h]``."""
        out = self.leaf[positions % self.block]
        for m in range(self.levels):
            out = out + self.level[m][(positions // (self.block * self.branching ** m)) % self.branching]
        return out


class FimMistralLM(mistral.MistralLM):
    def __init__(self, cfg: ModelConfig, par: ParallelConfig):
        from megatron.core.transformer.spec_utils import ModuleSpec

        spec = ModuleSpec(module=FimCoreAttention, params={"fim": cfg.fim, "seq_length": cfg.seq_length})
        super().__init__(cfg, par, core_attention=spec)
        self.fractal_position = (FractalPositionEmbedding(cfg, self.init_seed)
                                 if cfg.fim.position_embedding and self.gpt.pre_process else None)
        self.to(self.gpt.config.params_dtype)

    def embed(self, input_ids, positions):
        if self.fractal_position is None:
            return None
        tokens = self.gpt.embedding(input_ids=input_ids, position_ids=positions)  # [s, b, h]
        return tokens + self.fractal_position(positions[0])[:, None, :].to(tokens.dtype)

    def kv_cache(self, attention: FimCoreAttention) -> FimCache:
        return FimCache(attention.geometry, attention.branches, self.cfg.seq_length)


def build(cfg: ModelConfig, par: ParallelConfig) -> FimMistralLM:
    return FimMistralLM(cfg, par)


def parameter_count(cfg: ModelConfig) -> int:
    extra = 0
    if cfg.fim.position_embedding:
        extra = sum(math.prod(shape) for shape in FractalPositionEmbedding.shapes(cfg))
    return mistral.parameter_count(cfg) + extra


def attended_keys(cfg: ModelConfig, index: int) -> int:
    """Keys one query attends in layer ``index`` (upper bound, no causal discount)."""
    geom, branches = layer_geometry(cfg.fim, index, cfg.seq_length)
    keys = geom.block
    if "routed" in branches:
        keys += geom.top_k * geom.block
    if "hierarchical" in branches:
        keys += geom.levels * (geom.branching - 1)
    return min(keys, cfg.seq_length)


def training_flops_per_token(cfg: ModelConfig) -> float:
    """The baseline's convention (6 x matmul parameters + 12 x hidden x attended keys per layer),
    with FIM's attended keys; block routing's (N/B)^2 scores are negligible and not counted."""
    h = cfg.hidden_size
    matmul_params = mistral.parameter_count(cfg) - cfg.vocab_size * h
    return 6.0 * matmul_params + sum(12.0 * h * attended_keys(cfg, i) for i in range(cfg.num_layers))
