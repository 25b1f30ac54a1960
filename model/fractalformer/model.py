"""FractalFormer: a Mistral-style decoder (RMSNorm, RoPE, GQA, SwiGLU) whose weights hold nested,
self-similar sub-models, trained jointly (after the design document and MatFormer).

Level 0 is the full model of width ``h``. At level ``l`` there are ``m = branching^l`` models of
width ``h/m``, each with the same number of layers and heads (head dim ``head_dim/m``); model
``j`` owns the ``j``-th diagonal block of every weight matrix (``blocks``). Model ``j`` at level
``l`` thus contains models ``j*b .. j*b + b-1`` of level ``l+1``: the Sierpinski picture. The
feature order inside attention projections is (dimension, head), so that every model's rows are
one contiguous block and a model's own sub-blocks are again the next level's models.

All models of a level run as one batched matmul per weight. The embedding and the output head
are split by columns: every model predicts the full byte/token vocabulary from its slice.

Training loss: the weighted mean over levels of each level's mean loss (``level_weights``);
evaluation (``model.eval()``) and generation use the full model. ``upstream_residual`` (from the
document): after every layer a model adds the concatenated residual states of its sub-models,
so each model sees its sub-models' work; information flows up only, so any model with its
subtree is still a standalone model (``extract``).

Data parallel and ZeRO only: the trainer refuses TP/PP for this family.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cross_entropy import cross_entropy
from kernels.rmsnorm import rmsnorm_reference
from model.attention import causal_attention
from model.config import ModelConfig, ParallelConfig
from model.mistral import model as mistral


def blocks(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` diagonal blocks of a ``[out, in]`` matrix as ``[count, out/count, in/count]``
    (a view), or a vector ``[n]`` as ``[count, n/count]``."""
    if weight.dim() == 1:
        return weight.view(count, -1)
    out, inp = weight.shape
    return weight.view(count, out // count, count, inp // count).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def column_blocks(weight: torch.Tensor, count: int) -> torch.Tensor:
    """``[V, h]`` (embedding, output head) -> ``[count, V, h/count]``: every model's columns."""
    return weight.view(weight.shape[0], count, -1).transpose(0, 1)


def _linear(x: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """Each model's slice of ``x [m, b, s, in/m]`` through its own diagonal block."""
    w = blocks(weight, count)                                     # [m, out/m, in/m]
    m, b, s, _ = x.shape
    return torch.bmm(x.reshape(m, b * s, -1), w.transpose(1, 2)).view(m, b, s, -1)


def _norm(x: torch.Tensor, weight: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    return rmsnorm_reference(x, blocks(weight, count)[:, None, None, :], eps)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over ``x [..., s, d]`` with the frequencies of head dim d."""
    d, s = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-half[1], half[0]], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class NestedLayer(nn.Module):
    """One decoder layer of the full model; ``forward(x, count)`` runs all ``count`` models of a
    level on their slices ``x [count, b, s, h/count]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.heads, self.groups = cfg.num_attention_heads, cfg.num_query_groups
        head_dim = h // self.heads
        self.eps, self.theta = cfg.norm_eps, cfg.rope_theta

        def matrix(out: int, inp: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(out, inp).normal_(0, cfg.init_std))

        self.attn_norm, self.mlp_norm = nn.Parameter(torch.ones(h)), nn.Parameter(torch.ones(h))
        self.wq, self.wo = matrix(head_dim * self.heads, h), matrix(h, head_dim * self.heads)
        self.wk, self.wv = matrix(head_dim * self.groups, h), matrix(head_dim * self.groups, h)
        self.w_gate, self.w_up, self.w_down = matrix(f, h), matrix(f, h), matrix(h, f)
        with torch.no_grad():  # GPT-2's scaled init for the projections into the residual stream
            for w in (self.wo, self.w_down):
                w.mul_((2 * cfg.num_layers) ** -0.5)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``[m, b, s, dim*heads]`` in (dim, head) order -> ``[m*b, heads, s, dim]``."""
        m, b, s, _ = x.shape
        # contiguous: SDPA's fused CPU kernels need a unit stride along the head dimension
        return x.view(m, b, s, -1, heads).permute(0, 1, 4, 2, 3).reshape(m * b, heads, s, -1).contiguous()

    def forward(self, x: torch.Tensor, count: int) -> torch.Tensor:
        m, b, s, _ = x.shape
        a = _norm(x, self.attn_norm, count, self.eps)
        q = _rope(self._heads(_linear(a, self.wq, count), self.heads), self.theta)
        k = _rope(self._heads(_linear(a, self.wk, count), self.groups), self.theta)
        v = self._heads(_linear(a, self.wv, count), self.groups)
        o = causal_attention(q, k, v)
        o = o.view(m, b, self.heads, s, -1).permute(0, 1, 3, 4, 2).reshape(m, b, s, -1)
        x = x + _linear(o, self.wo, count)
        n = _norm(x, self.mlp_norm, count, self.eps)
        hidden = F.silu(_linear(n, self.w_gate, count)) * _linear(n, self.w_up, count)
        return x + _linear(hidden, self.w_down, count)


class FractalFormerLM(nn.Module):
    """``forward(input_ids [b, s], labels [b, s] | None)``: in training the joint per-token loss
    ``[b, s]`` over all levels; in eval mode the full model's loss; without labels the full
    model's logits ``[b, s, V]``. ``level_logits`` gives every model of every level."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ff = cfg.fractalformer
        self.cfg, self.levels, self.branching = cfg, ff.levels, ff.branching
        weights = torch.tensor(ff.level_weights or [1.0] * ff.levels, dtype=torch.float32)
        self.register_buffer("level_weights", weights / weights.sum(), persistent=False)
        self.embedding = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size).normal_(0, cfg.init_std))
        self.layers = nn.ModuleList(NestedLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.output = (self.embedding if cfg.tie_embeddings else
                       nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size).normal_(0, cfg.init_std)))
        self.last_level_losses: torch.Tensor | None = None

    def _upstream(self, children: torch.Tensor, count: int) -> torch.Tensor:
        """Level l+1 states ``[count*b, B, s, h/(count*b)]`` -> concatenated per parent
        ``[count, B, s, h/count]`` (a parent's width is exactly its children's)."""
        _, batch, s, width = children.shape
        grouped = children.view(count, self.branching, batch, s, width).permute(0, 2, 3, 1, 4)
        return grouped.reshape(count, batch, s, self.branching * width)

    def level_logits(self, input_ids: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Logits ``[b^l, batch, s, V]`` of every model at levels ``0 .. upto-1`` (default: all)."""
        upto = self.levels if upto is None else upto
        upstream = self.cfg.fractalformer.upstream_residual
        # Without upstream residuals levels are independent; with them level l needs level l+1.
        computed = range((self.levels if upstream else upto) - 1, -1, -1)
        tokens = F.embedding(input_ids, self.embedding)                           # [b, s, h]
        logits, below = {}, None
        for level in computed:
            count = self.branching ** level
            x = tokens.view(*tokens.shape[:2], count, -1).permute(2, 0, 1, 3)    # [m, b, s, h/m]
            states = []
            for i, layer in enumerate(self.layers):
                x = layer(x, count)
                if below is not None:
                    x = x + self._upstream(below[i], count)
                states.append(x)
            below = states if upstream else None
            if level < upto:
                final = _norm(x, self.final_norm, count, self.cfg.norm_eps).flatten(1, 2)
                head = column_blocks(self.output, count).transpose(1, 2)           # [m, h/m, V]
                logits[level] = torch.bmm(final, head).view(count, *input_ids.shape, -1)
        return [logits[level] for level in range(upto)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return self.level_logits(input_ids, upto=1)[0][0]
        if not self.training:
            return cross_entropy(self.level_logits(input_ids, upto=1)[0][0], labels)
        losses = [cross_entropy(logits, labels.expand(logits.shape[0], *labels.shape)).mean(0)
                  for logits in self.level_logits(input_ids)]                      # per level [b, s]
        self.last_level_losses = torch.stack([loss.detach().mean() for loss in losses])
        return sum(w * loss for w, loss in zip(self.level_weights, losses))

    def log_metrics(self) -> dict[str, float]:
        """The last training step's loss of each level (this rank), for metrics.jsonl."""
        if self.last_level_losses is None:
            return {}
        return {f"loss_level{level}": float(v) for level, v in enumerate(self.last_level_losses)}

    def extract(self, level: int, index: int) -> "FractalFormerLM":
        """Model ``index`` of ``level`` (with its own sub-models) as a standalone FractalFormerLM."""
        if not (0 <= level < self.levels and 0 <= index < self.branching ** level):
            raise ValueError(f"no model {index} at level {level} (levels {self.levels}, "
                             f"{self.branching}^level models per level)")
        count = self.branching ** level
        cfg = copy.deepcopy(self.cfg)
        cfg.hidden_size //= count
        cfg.ffn_hidden_size //= count
        cfg.fractalformer.levels -= level
        cfg.fractalformer.level_weights = cfg.fractalformer.level_weights[level:]
        sub = FractalFormerLM(cfg).to(self.embedding.dtype)
        state = {}
        for name, p in self.state_dict().items():
            cut = column_blocks if name in ("embedding", "output") else blocks
            state[name] = cut(p, count)[index].clone()
        sub.load_state_dict(state)
        return sub


def build(cfg: ModelConfig, par: ParallelConfig) -> FractalFormerLM:
    model = FractalFormerLM(cfg)
    return model.to(torch.bfloat16) if par.dtype == "bf16" else model


def parameter_count(cfg: ModelConfig) -> int:
    """The full model's parameters (every sub-model lives inside them): Mistral's formula."""
    return mistral.parameter_count(cfg)


def training_flops_per_token(cfg: ModelConfig) -> float:
    """Sum over levels of Mistral's convention for that level's models: level l runs b^l models
    with 1/b^l of every layer matrix each (layer matmuls / b^l in all), the full output head
    (each model's h/b^l columns x V), and attention over the full context at full width."""
    ff, h, v = cfg.fractalformer, cfg.hidden_size, cfg.vocab_size
    layer_matmuls = mistral.parameter_count(cfg) - (1 if cfg.tie_embeddings else 2) * v * h
    total = 0.0
    for level in range(ff.levels):
        total += 6.0 * (layer_matmuls / ff.branching ** level + v * h)
        total += 12.0 * cfg.num_layers * h * cfg.seq_length
    return total
