"""model.fim: FIM attention's settings, model-wide and per layer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from kernels.fim_geometry import BRANCHES
from model.config import ConfigError, ModelConfig, Section


@dataclass
class FimLayerConfig:
    """One layer's overrides of the model-wide FIM settings (unset keys: the model-wide value)."""
    block_size: Optional[int] = None
    branching: Optional[int] = None
    levels: Optional[int] = None
    top_k: Optional[int] = None
    branches: Optional[str] = None


@dataclass
class FimConfig(Section):
    """FIM attention (model.name=fim_mistral): see kernels/fim_geometry.py for the definitions."""
    block_size: int = 32               # B: leaf block, attended exactly (causally)
    branching: int = 2                 # b: children per unit of the hierarchy
    levels: int = -1                   # hierarchical levels; -1: enough to cover seq_length
    top_k: int = 2                     # routed leaf blocks per query block
    branches: str = "local,hierarchical,routed"  # comma-separated subset; local is required
    pooling: Literal["mean"] = "mean"  # how a unit's keys/values are summarized
    position_embedding: bool = True    # learned embedding per fractal coordinate level, beside RoPE
    layers: list[FimLayerConfig] = field(default_factory=list)  # per layer (index 0 = first layer)

    def validate(self) -> None:
        for i in range(len(self.layers)):
            self.for_layer(i, where=f"model.fim.layers[{i}]")
        self.for_layer(None, where="model.fim")

    def validate_with(self, model: ModelConfig) -> None:
        if len(self.layers) > model.num_layers:
            raise ConfigError(f"model.fim.layers has {len(self.layers)} entries but the model has "
                              f"{model.num_layers} layers")

    def for_layer(self, index: int | None, where: str = "model.fim") -> FimLayerConfig:
        """Resolved settings of one layer (0-based; None: the model-wide ones), validated."""
        own = self.layers[index] if index is not None and index < len(self.layers) else FimLayerConfig()
        merged = FimLayerConfig(**{f.name: getattr(self, f.name) if getattr(own, f.name) is None
                                   else getattr(own, f.name) for f in dataclasses.fields(own)})
        if merged.block_size <= 0 or merged.branching < 2 or merged.top_k < 0 or merged.levels < -1:
            raise ConfigError(f"{where}: need block_size > 0, branching >= 2, top_k >= 0, levels >= -1 "
                              f"(got {merged.block_size}, {merged.branching}, {merged.top_k}, "
                              f"{merged.levels})")
        chosen = [b.strip() for b in merged.branches.split(",") if b.strip()]
        unknown = [b for b in chosen if b not in BRANCHES]
        if unknown or "local" not in chosen:
            raise ConfigError(f"{where}.branches={merged.branches!r}: a comma-separated subset of "
                              f"{', '.join(BRANCHES)} that includes local")
        merged.branches = ",".join(chosen)
        return merged
