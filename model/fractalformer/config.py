"""model.fractalformer: the nesting of the self-similar sub-models."""
from __future__ import annotations

from dataclasses import dataclass, field

from model.config import ConfigError, ModelConfig, Section


@dataclass
class FractalFormerConfig(Section):
    """model.name=fractalformer (model/fractalformer/model.py): ``levels`` nested levels; every model
    at level l holds ``branching`` models at level l+1, each 1/branching of its width."""
    levels: int = 3                    # level 0: the full model
    branching: int = 2
    level_weights: list[float] = field(default_factory=list)  # joint loss weights; empty: equal
    upstream_residual: bool = False    # add the sub-models' concatenated residual states to their parent's

    def validate(self) -> None:
        if self.levels < 1 or self.branching < 2:
            raise ConfigError(f"model.fractalformer: need levels >= 1 and branching >= 2 (got "
                              f"{self.levels}, {self.branching})")
        if self.level_weights and (len(self.level_weights) != self.levels
                                   or min(self.level_weights) < 0 or sum(self.level_weights) <= 0):
            raise ConfigError(f"model.fractalformer.level_weights={self.level_weights}: one weight "
                              f">= 0 per level ({self.levels}), not all zero; or empty for equal")

    def validate_with(self, model: ModelConfig) -> None:
        split = self.branching ** (self.levels - 1)
        head_dim = model.hidden_size // model.num_attention_heads
        for key, value, multiple in (("hidden_size", model.hidden_size, split),
                                     ("ffn_hidden_size", model.ffn_hidden_size, split),
                                     ("hidden_size / num_attention_heads", head_dim, 2 * split)):
            if value % multiple:
                raise ConfigError(f"model.{key}={value} must be divisible by {multiple} for "
                                  f"model.fractalformer levels={self.levels}, branching="
                                  f"{self.branching} (the smallest models' share, even for RoPE)")
