"""The optional methods a model may have, one Protocol each. A family declares the ones its model
implements in its registry entry (``Supports``); callers read the declaration, and
tests/test_registry.py checks every family's model against its declaration."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from model.config import ModelConfig


@runtime_checkable
class IncrementalDecoder(Protocol):
    """Supports.incremental_decoding: one token at a time from a carried state (a recurrence or
    KV caches) instead of re-running the context."""

    def initial_state(self, batch: int) -> Any: ...

    def step(self, token: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...


@runtime_checkable
class SpeedGroups(Protocol):
    """Supports.speed_groups: parameter name -> speed, for optim.param_groups=multispeed."""

    def speed_groups(self) -> dict[str, str]: ...


@runtime_checkable
class TrainingMetrics(Protocol):
    """Supports.training_metrics: numbers of the last training batch merged into each record."""

    def log_metrics(self) -> dict[str, float]: ...


@runtime_checkable
class Describes(Protocol):
    """Supports.describes_itself: a summary for the run's log, e.g. fractal Mamba's drawn
    architecture."""

    def describe(self) -> str: ...


@runtime_checkable
class UntiesHead(Protocol):
    """Supports.untied_head: give a tied output head its own weight, so pruning can treat it
    apart from the embedding."""

    def untie_head(self) -> None: ...


@runtime_checkable
class PretrainedParts(Protocol):
    """Supports.pretrained_parts: parts loaded from other model directories (BSFIN's entropy
    model); whoever builds the model loads each and attaches it."""

    def pretrained_parts(self) -> dict[str, str]: ...

    def attach_pretrained(self, name: str, module: nn.Module, cfg: ModelConfig) -> None:
        """``cfg``: the loaded part's model config, to check it fits."""
