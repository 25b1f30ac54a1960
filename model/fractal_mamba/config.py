"""model.fractal_mamba: the drawn fractal modules and the Mamba blocks."""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError, Section, require_positive


@dataclass
class FractalMambaConfig(Section):
    """model.name=fractal_mamba (model/fractal_mamba/model.py). Each layer holds ``modules_per_layer``
    fractal modules whose depth and width are drawn from the ranges below by ``architecture_seed``:
    the drawn architecture is a function of this config alone, so a checkpoint rebuilds it."""
    modules_per_layer: int = 2
    depth_min: int = 1                 # fractal depth c: 2^c - 1 linear layers per module
    depth_max: int = 3
    width_min: int = 128               # module width, drawn in multiples of 8
    width_max: int = 256
    drop_path: float = 0.0             # FractalNet local drop-path at each join (training only)
    architecture_seed: int = 0
    state_size: int = 16               # Mamba SSM state per channel
    expand: int = 2                    # Mamba inner width = expand x hidden_size
    conv_kernel: int = 4

    def validate(self) -> None:
        require_positive(self, "model.fractal_mamba", ["depth_min", "width_min", "state_size", "expand",
                                                 "conv_kernel"])
        if self.modules_per_layer < 0:
            raise ConfigError("model.fractal_mamba.modules_per_layer must be >= 0")
        if self.depth_max < self.depth_min or self.width_max < self.width_min:
            raise ConfigError("model.fractal_mamba: depth_max >= depth_min and width_max >= width_min")
        if -(-self.width_min // 8) * 8 > self.width_max:
            raise ConfigError(f"model.fractal_mamba: no multiple of 8 in [width_min, width_max] = "
                              f"[{self.width_min}, {self.width_max}] (widths are multiples of 8)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.fractal_mamba.drop_path={self.drop_path} must be in [0, 1)")
