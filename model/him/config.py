"""model.him: memory, reasoning buffer and fast/slow paths."""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError, Section


@dataclass
class HimConfig(Section):
    """model.name=him (model/him/model.py). Memory and reasoning buffer advance once per ``chunk_size``
    tokens, so a token only sees states built from earlier chunks (causal)."""
    cognitive: bool = True             # False: the ablation (no gate, memory or reasoning buffer)
    memory_slots: int = 16
    memory_rank: int = 16              # low-rank read/write projections
    reasoning_tokens: int = 64
    reasoning_every: int = 3           # refine the shared buffer after every 3rd layer
    reasoning_momentum: float = 0.9    # moving average: buffer = m x buffer + (1 - m) x refined
    chunk_size: int = 64
    decoder_tokens: int = 64           # learned tokens every position cross-attends to before the head
    memory_sparsity_weight: float = 0.01
    reasoning_diversity_weight: float = 0.01
    routing_balance_weight: float = 0.01

    def validate(self) -> None:
        for key in ("memory_slots", "memory_rank", "reasoning_tokens", "reasoning_every", "chunk_size",
                    "decoder_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.him.{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.reasoning_momentum < 1:
            raise ConfigError(f"model.him.reasoning_momentum={self.reasoning_momentum} must be in [0, 1)")
        for key in ("memory_sparsity_weight", "reasoning_diversity_weight", "routing_balance_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.him.{key} must be >= 0")
