"""One registry entry per model family: ``model.name`` -> where its code lives, its config section
and what it supports. Config validation, the trainer, generate, compress and the benchmarks read
these declarations, never a list of names. A family's code is imported when it is first built or
sized: ``import model`` stays cheap (megatron-core's imports take seconds).

Adding a family: a folder ``model/<name>/`` with ``model.py`` (``build``, ``parameter_count``,
``training_flops_per_token``) and, if it has settings of its own, ``config.py`` (a ``Section``
dataclass), plus one ``register(...)`` call below (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

from .bsfin.config import BsfinConfig
from .config import ConfigError, ModelConfig, ParallelConfig, register_section
from .fim_mistral.config import FimConfig
from .fractal_mamba.config import FractalMambaConfig
from .fractalformer.config import FractalFormerConfig
from .him.config import HimConfig


@dataclass(frozen=True)
class Supports:
    """What a family implements beyond data parallelism and ZeRO 0-3 (which every family has).
    Flags marked with a hook name promise the method of that name in model/hooks.py."""
    tensor_parallel: bool = False        # megatron layers split over parallel.tp ranks
    pipeline_parallel: bool = False      # layers split into parallel.pp stages
    sequence_parallel: bool = False      # parallel.sequence_parallel (with tensor_parallel)
    document_masking: bool = False       # data.mask_documents: attention kept within documents
    sliding_window: bool = False         # model.sliding_window > 0 is accepted
    hf_export: bool = False              # transformers' Mistral: export --format hf, train.init_from, bench train
    incremental_decoding: bool = False   # IncrementalDecoder: generate carries a state per token
    speed_groups: bool = False           # SpeedGroups: optim.param_groups=multispeed
    training_metrics: bool = False       # TrainingMetrics: numbers of its own in metrics.jsonl
    describes_itself: bool = False       # Describes: a summary the trainer prints (a drawn architecture)
    untied_head: bool = False            # UntiesHead: compress prunes an untied output head
    pretrained_parts: bool = False       # PretrainedParts: parts loaded from other model dirs


@dataclass(frozen=True)
class ModelFamily:
    name: str
    module: str                          # its build / parameter_count / training_flops_per_token
    description: str
    section: str | None = None           # its settings: model.<section>
    config: type | None = None           # their dataclass (a model.config.Section)
    supports: Supports = field(default_factory=Supports)

    def _code(self):
        return importlib.import_module(self.module)

    def build(self, cfg: ModelConfig, par: ParallelConfig) -> nn.Module:
        """The model for this rank's part of the layout. ``model.kernels`` becomes the process's
        kernel dispatch mode first (Triton on CUDA, or the torch references everywhere)."""
        from kernels import dispatch

        dispatch.set_mode(cfg.kernels)
        return self._code().build(cfg, par)

    def parameter_count(self, cfg: ModelConfig) -> int:
        return self._code().parameter_count(cfg)

    def training_flops_per_token(self, cfg: ModelConfig) -> float:
        return self._code().training_flops_per_token(cfg)

    def validate(self, cfg: ModelConfig) -> None:
        """The rules that tie the family's section to the shared model fields."""
        if self.section is not None:
            cfg.sections[self.section].validate_with(cfg)


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    if (family.section is None) != (family.config is None):
        raise ValueError(f"model family {family.name!r}: give both section and config, or neither")
    if family.section is not None:
        register_section(family.section, family.config)
    _FAMILIES[family.name] = family
    return family


def names() -> list[str]:
    return sorted(_FAMILIES)


def families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise ConfigError(f"model.name={name!r} is not registered (allowed: {', '.join(names())})")
    return _FAMILIES[name]


register(ModelFamily(
    "mistral", "model.mistral.model", "Mistral baseline (megatron-core GPTModel, sliding-window GQA)",
    supports=Supports(tensor_parallel=True, pipeline_parallel=True, sequence_parallel=True,
                      document_masking=True, sliding_window=True, hf_export=True,
                      incremental_decoding=True)))
register(ModelFamily(
    "fim_mistral", "model.fim_mistral.model",
    "FIM-Mistral (local + hierarchical summaries + routed blocks attention)", "fim", FimConfig,
    # sliding_window: accepted and unused (FIM attention replaces the window), so one setting
    # can serve every arm of a comparison
    Supports(tensor_parallel=True, pipeline_parallel=True, sliding_window=True, incremental_decoding=True)))
register(ModelFamily(
    "fractal_mamba", "model.fractal_mamba.model",
    "fractal Mamba (byte-level; seeded fractal modules + Mamba blocks)", "fractal_mamba",
    # sliding_window: accepted and unused (a recurrence has no attention window), as before
    FractalMambaConfig, Supports(sliding_window=True, incremental_decoding=True, describes_itself=True)))
register(ModelFamily(
    "fractalformer", "model.fractalformer.model",
    "FractalFormer (nested self-similar sub-models, trained jointly)", "fractalformer",
    FractalFormerConfig, Supports(training_metrics=True)))
register(ModelFamily(
    "him", "model.him.model", "HIM (working memory, reasoning buffer, fast/slow FFN paths)", "him",
    HimConfig, Supports(incremental_decoding=True, speed_groups=True, training_metrics=True, untied_head=True)))
register(ModelFamily(
    "bsfin", "model.bsfin.model",
    "BSFIN (byte entropy patches, complex interference attention over patches)", "bsfin",
    BsfinConfig, Supports(training_metrics=True, pretrained_parts=True)))
