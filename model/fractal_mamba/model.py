"""Fractal Mamba: a byte-level language model whose layers each hold a few *fractal modules*
(recursive sub-blocks of seeded random depth and width) followed by a Mamba block.

The design document leaves "recursive probabilistic fractals" undefined; we read it as
FractalNet's expansion rule (Larsson et al., 2016) applied position-wise:

    f_1(x) = unit(x)            f_{c+1}(x) = join(f_c(f_c(x)), unit(x))

with ``unit`` = linear + SiLU at the module's width and ``join`` = the mean of the paths, with
FractalNet's local drop-path during training (``drop_path``). Depth and width per module are
drawn by ``architecture_seed``, so the architecture is a function of the config a checkpoint
carries. The fractal modules mix channels only; the Mamba block is the sequence mixer, so the
model is causal and generation is recurrent: O(1) work and state per byte (``step``).

Layer: ``h += sum_i module_i(norm(h)); h += mamba(norm(h))``. Data parallel and ZeRO only: the
trainer refuses TP/PP (the family has no sharded layers or pipeline stages).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cross_entropy import cross_entropy
from kernels.rmsnorm import rmsnorm
from model.config import ModelConfig, ParallelConfig
from model.fractal_mamba.mamba import MambaBlock


def draw_architecture(cfg: ModelConfig) -> list[list[tuple[int, int]]]:
    """Per layer, per fractal module: (depth, width), drawn by ``architecture_seed`` alone."""
    fm = cfg.fractal_mamba
    rng = random.Random(fm.architecture_seed)
    low, high = -(-fm.width_min // 8), fm.width_max // 8
    return [[(rng.randint(fm.depth_min, fm.depth_max), 8 * rng.randint(low, high))
             for _ in range(fm.modules_per_layer)] for _ in range(cfg.num_layers)]


def _join(paths: list[torch.Tensor], drop: float, training: bool) -> torch.Tensor:
    """Mean of the paths; in training each path is dropped per sample with probability ``drop``,
    at least one kept (FractalNet's local drop-path)."""
    if not training or drop == 0.0:
        return torch.stack(paths).mean(0)
    batch = paths[0].shape[0]
    keep = torch.rand(len(paths), batch, device=paths[0].device) >= drop
    none = ~keep.any(0)
    keep[torch.randint(len(paths), (batch,), device=keep.device), torch.arange(batch)] |= none
    keep = keep.to(paths[0].dtype).view(len(paths), batch, *([1] * (paths[0].dim() - 1)))
    return (torch.stack(paths) * keep).sum(0) / keep.sum(0)


class FractalBlock(nn.Module):
    def __init__(self, width: int, depth: int, drop_path: float):
        super().__init__()
        self.unit = nn.Linear(width, width, bias=False)
        self.deep = (nn.Sequential(FractalBlock(width, depth - 1, drop_path),
                                   FractalBlock(width, depth - 1, drop_path)) if depth > 1 else None)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = F.silu(self.unit(x))
        if self.deep is None:
            return shallow
        return _join([self.deep(x), shallow], self.drop_path, self.training)


class FractalModule(nn.Module):
    """hidden -> width -> fractal block of the given depth -> hidden."""

    def __init__(self, hidden: int, width: int, depth: int, drop_path: float):
        super().__init__()
        self.inp = nn.Linear(hidden, width, bias=False)
        self.fractal = FractalBlock(width, depth, drop_path)
        self.out = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fractal(self.inp(x)))


class Norm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden)), eps

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


class FractalMambaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, modules: list[tuple[int, int]]):
        super().__init__()
        fm, h = cfg.fractal_mamba, cfg.hidden_size
        self.fractal_norm = Norm(h, cfg.norm_eps)
        self.fractals = nn.ModuleList(FractalModule(h, w, d, fm.drop_path) for d, w in modules)
        self.mamba_norm = Norm(h, cfg.norm_eps)
        self.mamba = MambaBlock(h, fm.state_size, fm.expand, fm.conv_kernel)

    def _fractal(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.fractals):
            x = self.fractal_norm(h)
            h = h + sum(module(x) for module in self.fractals)
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self._fractal(h)
        return h + self.mamba(self.mamba_norm(h))

    def step(self, h: torch.Tensor, state):
        h = self._fractal(h)
        out, state = self.mamba.step(self.mamba_norm(h), state)
        return h + out, state


class FractalMambaLM(nn.Module):
    """``forward(input_ids [b, s], labels [b, s] | None) ->`` per-token loss ``[b, s]`` (fp32), or
    logits ``[b, s, V]`` without labels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.architecture = cfg, draw_architecture(cfg)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(FractalMambaLayer(cfg, modules) for modules in self.architecture)
        self.final_norm = Norm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # init_std for our layers, GPT-2's scaled std for those writing into the residual stream;
        # the Mamba block keeps upstream's initialization of its inner projections.
        residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, FractalModule):
                    module.inp.weight.normal_(0, cfg.init_std)
                    module.out.weight.normal_(0, residual_std)
                if isinstance(module, FractalBlock):
                    module.unit.weight.normal_(0, cfg.init_std)
                if isinstance(module, MambaBlock):
                    module.out_proj.weight.normal_(0, residual_std)
            self.embedding.weight.normal_(0, cfg.init_std)
            self.output.weight.normal_(0, cfg.init_std)
        if cfg.tie_embeddings:
            self.output.weight = self.embedding.weight

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.final_norm(h))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(input_ids)
        return logits if labels is None else cross_entropy(logits, labels)

    def initial_state(self, batch: int, device=None) -> list:
        return [layer.mamba.initial_state(batch, device) for layer in self.layers]

    def step(self, input_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One byte per sequence: ``[b]`` ids and the carried state -> (logits ``[b, V]``, state)."""
        h = self.embedding(input_ids)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            h, layer_state = layer.step(h, layer_state)
            new_state.append(layer_state)
        return self.output(self.final_norm(h)), new_state

    def describe(self) -> str:
        rows = [f"layer {i}: " + (", ".join(f"depth {d} width {w}" for d, w in modules) or "no fractal modules")
                for i, modules in enumerate(self.architecture)]
        seed = self.cfg.fractal_mamba.architecture_seed
        return f"fractal modules (architecture_seed {seed}):\n  " + "\n  ".join(rows)


def build(cfg: ModelConfig, par: ParallelConfig) -> FractalMambaLM:
    model = FractalMambaLM(cfg)
    return model.to(torch.bfloat16) if par.dtype == "bf16" else model


def _mamba_sizes(cfg: ModelConfig) -> tuple[int, int, int, int]:
    fm = cfg.fractal_mamba
    inner = fm.expand * cfg.hidden_size
    return inner, fm.state_size, math.ceil(cfg.hidden_size / 16), fm.conv_kernel


def _matmul_parameters(cfg: ModelConfig) -> int:
    """Parameters used in matrix products per token (everything but embedding, norms, conv, A, D)."""
    h = cfg.hidden_size
    inner, n, rank, _ = _mamba_sizes(cfg)
    mamba = h * 2 * inner + inner * (rank + 2 * n) + rank * inner + inner * h
    fractal = sum(2 * h * w + (2 ** d - 1) * w * w for layer in draw_architecture(cfg) for d, w in layer)
    return cfg.num_layers * mamba + fractal + cfg.vocab_size * h


def parameter_count(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    inner, n, _, kernel = _mamba_sizes(cfg)
    per_layer_other = 2 * h + inner * kernel + inner + inner + inner * n + inner  # norms, conv, dt bias, A, D
    embedding = cfg.vocab_size * h
    tied = embedding if cfg.tie_embeddings else 0
    return _matmul_parameters(cfg) - tied + embedding + cfg.num_layers * per_layer_other + h


def training_flops_per_token(cfg: ModelConfig) -> float:
    """6 x matmul parameters + per layer the conv (6 x kernel x inner) and the scan, counted as
    18 x inner x state (forward: decay, update and readout, ~6 per state element; backward 2x)."""
    inner, n, _, kernel = _mamba_sizes(cfg)
    return 6.0 * _matmul_parameters(cfg) + cfg.num_layers * (18.0 * inner * n + 6.0 * kernel * inner)
