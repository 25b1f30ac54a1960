"""model.bsfin: entropy patching, the local byte encoder/decoder and the interference stack."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.config import ConfigError, Section


@dataclass
class BsfinConfig(Section):
    """model.name=bsfin (model/bsfin/model.py): bytes -> entropy patches -> local encoder -> complex
    interference stack over patches (width model.hidden_size, model.num_layers layers,
    model.num_attention_heads heads, FFN model.ffn_hidden_size) -> local byte decoder."""
    patching: Literal["window", "model"] = "window"   # entropy source: sliding-window Shannon, or a byte LM
    entropy_model: str = ""            # patching=model: an export/compress dir or checkpoint of a byte-level model
    entropy_window: int = 16           # patching=window: bytes in the histogram
    threshold: float = 3.0             # bits (relative: the rise over the previous byte's entropy)
    relative: bool = False
    min_patch: int = 2
    max_patch: int = 12
    local_hidden: int = 128            # byte encoder / decoder width
    local_heads: int = 4
    encoder_layers: int = 1
    decoder_layers: int = 2
    ngram_sizes: list[int] = field(default_factory=lambda: [3, 4, 5])   # hashed n-gram features; empty: none
    ngram_buckets: int = 4096
    score_mode: Literal["quantum", "classical"] = "quantum"
    rope: bool = True
    entangle: bool = True
    complex_to_real: Literal["concat", "magnitude"] = "concat"
    memory_dim: int = 0                # width of the patch memory the decoder reads (0: local_hidden)
    flops_patch_bytes: float = 4.0     # mean patch length assumed by the closed-form FLOPs (training logs the real one)

    def validate(self) -> None:
        for key in ("entropy_window", "min_patch", "max_patch", "local_hidden", "local_heads", "encoder_layers",
                    "decoder_layers", "ngram_buckets"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.bsfin.{key}={getattr(self, key)} must be >= 1")
        if self.min_patch > self.max_patch:
            raise ConfigError(f"model.bsfin.min_patch={self.min_patch} must be <= max_patch={self.max_patch}")
        if self.local_hidden % self.local_heads:
            raise ConfigError(f"model.bsfin.local_hidden={self.local_hidden} must be divisible by local_heads")
        if any(n < 2 for n in self.ngram_sizes):
            raise ConfigError(f"model.bsfin.ngram_sizes={self.ngram_sizes}: n-grams need n >= 2")
        if self.patching == "model" and not self.entropy_model:
            raise ConfigError("model.bsfin.patching=model needs model.bsfin.entropy_model (a byte-level model dir)")
        if self.flops_patch_bytes < 1 or self.memory_dim < 0:
            raise ConfigError("model.bsfin.flops_patch_bytes must be >= 1 and memory_dim >= 0")
