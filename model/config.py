"""The ``model`` section of a run config: the fields every family shares, and one sub-section per
family that has its own settings (``model.fim``, ``model.him``, ...), declared by the family's
registry entry (model/registry.py) and defined in its folder.

Configs are dataclasses validated on load; a user-fixable problem raises ``ConfigError`` with one
line naming the dotted key and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key."""


def require_positive(obj: Any, section: str, keys: list[str]) -> None:
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ConfigError(f"{section}.{key}={getattr(obj, key)} must be > 0")


class Section:
    """Base of a family's settings (``model.<key>``): ``validate`` checks its own fields (every
    section, on every load); ``validate_with`` the rules that tie them to the shared fields (the
    active family's section only)."""

    def validate(self) -> None:
        pass

    def validate_with(self, model: "ModelConfig") -> None:
        pass


# model.<key> -> the dataclass of that family section, in registration order (model/registry.py).
_SECTIONS: dict[str, type] = {}


def register_section(key: str, cls: type) -> None:
    if key in _SECTIONS and _SECTIONS[key] is not cls:
        raise ValueError(f"model.{key} is already the section of another family")
    _SECTIONS[key] = cls


def section_types() -> dict[str, type]:
    return dict(_SECTIONS)


@dataclass
class ModelConfig:
    name: str = "mistral"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: int = 2          # KV heads (GQA); equal to heads means plain MHA
    ffn_hidden_size: int = 768
    vocab_size: int = 0                # 0: taken from the dataset's tokenizer, padded
    seq_length: int = 256
    sliding_window: int = 0            # 0: full causal attention
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    attention_backend: Literal["sdpa", "reference"] = "sdpa"
    # auto: fused Triton kernels (kernels/) on CUDA, their torch references elsewhere;
    # reference: the torch references everywhere (to compare numerics or rule a kernel out)
    kernels: Literal["auto", "reference"] = "auto"
    # Every registered family's section (model.fim, model.him, ...), read as attributes
    # (cfg.model.fim); in YAML and in to_dict() they sit beside the fields above.
    sections: dict[str, Any] = field(default_factory=lambda: {k: c() for k, c in _SECTIONS.items()},
                                     repr=False)

    def __getattr__(self, key: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if key in sections:
            return sections[key]
        raise AttributeError(f"model config has no field or family section {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        sections = self.__dict__.get("sections")
        if sections is not None and key in sections:   # cfg.model.fim = ... replaces the section
            sections[key] = value
        else:
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict:
        tree = dataclasses.asdict(self)
        sections = tree.pop("sections")
        return {**tree, **sections}

    def validate(self) -> None:
        """The shared fields, then each family section's own fields; the rules that tie the
        active family's section to the shared fields come after (``ModelFamily.validate``), so an
        error names its real cause."""
        require_positive(self, "model", ["num_layers", "hidden_size", "num_attention_heads",
                                         "num_query_groups", "ffn_hidden_size", "seq_length"])
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be "
                              f"divisible by model.num_query_groups={self.num_query_groups}")
        if self.sliding_window < 0 or self.vocab_size < 0:
            raise ConfigError("model.sliding_window and model.vocab_size must be >= 0")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_attention_heads must be even (RoPE)")
        for section in self.sections.values():
            section.validate()


@dataclass
class ParallelConfig:
    """The ``parallel`` section: the layout a model is built for (megatron-core reads tp, pp,
    dtype, recompute and sequence_parallel) and the engine's ZeRO stage."""
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    dtype: Literal["fp32", "bf16"] = "fp32"
    recompute: bool = False            # activation checkpointing: recompute each layer in backward
    sequence_parallel: bool = False    # megatron sequence parallelism (needs tp > 1 and CUDA)

    def validate(self) -> None:
        require_positive(self, "parallel", ["tp", "pp"])
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} is invalid (allowed: 0, 1, 2, 3)")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.pp={self.pp} needs parallel.zero_stage 0 or 1, not {self.zero_stage}: "
                "ZeRO-2/3 partition gradients inside DeepSpeed's backward, which a pipeline schedule "
                "bypasses (DeepSpeed's own pipeline engine has the same limit)")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
