"""The Mamba (S6) block: in_proj -> causal depthwise conv1d -> SiLU -> input-dependent dt, B, C ->
selective scan -> gate by SiLU(z) -> out_proj. Semantics and parameter names of mamba-ssm's
``Mamba`` / transformers' ``MambaMixer`` (so weights load across), written as plain PyTorch; the
scan goes through ``kernels.selective_scan`` (Triton on CUDA, the reference elsewhere).

``step`` is recurrent inference: one position at a time with the conv window and the SSM state
carried, O(1) work per token, equal to the parallel forward (tested).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.selective_scan import selective_scan


class MambaBlock(nn.Module):
    def __init__(self, hidden_size: int, state_size: int = 16, expand: int = 2,
                 conv_kernel: int = 4, dt_rank: int | None = None, dt_min: float = 1e-3,
                 dt_max: float = 0.1, bias: bool = False, conv_bias: bool = True):
        super().__init__()
        inner = expand * hidden_size
        self.inner, self.state_size, self.conv_kernel = inner, state_size, conv_kernel
        self.dt_rank = dt_rank or math.ceil(hidden_size / 16)
        self.in_proj = nn.Linear(hidden_size, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, conv_kernel, groups=inner, padding=conv_kernel - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_size + 1, dtype=torch.float32))
                                  .repeat(inner, 1))        # S4D-real initialization
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, hidden_size, bias=bias)
        with torch.no_grad():  # dt = softplus(bias) log-uniform in [dt_min, dt_max], as upstream
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _ssm_inputs(self, x: torch.Tensor):
        """x ``[..., inner]`` after the conv -> (dt before softplus/bias ``[..., inner]``, B, C)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        return dt @ self.dt_proj.weight.t(), B, C

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[batch, length, hidden]`` -> same shape; causal."""
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)          # [b, inner, L]
        x = F.silu(self.conv1d(x)[..., :length])
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        y = selective_scan(x, dt.transpose(1, 2), -torch.exp(self.A_log.float()),
                           B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def initial_state(self, batch: int, device=None, dtype=torch.float32):
        """(conv window ``[b, inner, kernel]``, SSM state ``[b, inner, state]``), zeros."""
        return (torch.zeros(batch, self.inner, self.conv_kernel, device=device, dtype=dtype),
                torch.zeros(batch, self.inner, self.state_size, device=device, dtype=torch.float32))

    def step(self, hidden: torch.Tensor, state):
        """One position: ``[batch, hidden]`` and the carried state -> (``[batch, hidden]``, state)."""
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                          # [b, inner]
        conv_state = torch.cat([conv_state[..., 1:], x[..., None]], dim=-1)
        x = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        x = F.silu(x + self.conv1d.bias if self.conv1d.bias is not None else x)
        dt, B, C = self._ssm_inputs(x)
        dt = F.softplus(dt.float() + self.dt_proj.bias.float())
        decay = torch.exp(dt[..., None] * -torch.exp(self.A_log.float()))
        ssm_state = decay * ssm_state + (dt * x.float())[..., None] * B.float()[:, None, :]
        y = (ssm_state * C.float()[:, None, :]).sum(-1) + self.D.float() * x.float()
        y = (y * F.silu(z.float())).to(hidden.dtype)
        return self.out_proj(y), (conv_state, ssm_state)
