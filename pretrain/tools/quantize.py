"""Dynamic int8 quantization of a loaded model for CPU inference (`generate --int8`, `compress`)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from model import get_family
from model.config import ModelConfig
from model.hooks import UntiesHead


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def quantize_int8(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """Dynamic int8 quantization (weights int8, activations quantized per batch) of every
    ``nn.Linear``, in place (no second copy of the model at peak memory); a model with a tied
    output head (Supports.untied_head) first gets a Linear copy of it so that the head, the biggest
    matmul of a small model, is quantized too."""
    if get_family(model_cfg.name).supports.untied_head:
        assert isinstance(model, UntiesHead)
        model.untie_head()
    if not linear_layers(model):
        raise ValueError(f"{type(model).__name__} has no torch.nn.Linear layers to quantize "
                         "(megatron-core's parallel linear layers are not)")
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated, not yet replaced in core
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
