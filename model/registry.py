"""One registry entry per model family: ``model.name`` -> builder and closed-form size."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

from pretrain.config import ConfigError, ModelConfig, ParallelConfig


@dataclass(frozen=True)
class ModelFamily:
    build: Callable[[ModelConfig, ParallelConfig], nn.Module]
    parameter_count: Callable[[ModelConfig], int]
    training_flops_per_token: Callable[[ModelConfig], float]
    description: str
    # Which of tensor / pipeline parallelism the family's layers implement (DP and ZeRO: all).
    tensor_parallel: bool = True
    pipeline_parallel: bool = True


def _mistral() -> ModelFamily:
    from . import mistral
    return ModelFamily(mistral.build, mistral.parameter_count, mistral.training_flops_per_token,
                       "Mistral baseline (megatron-core GPTModel, sliding-window GQA)")


def _fim_mistral() -> ModelFamily:
    from . import fim_mistral
    return ModelFamily(fim_mistral.build, fim_mistral.parameter_count,
                       fim_mistral.training_flops_per_token,
                       "FIM-Mistral (local + hierarchical summaries + routed blocks attention)")


def _fractal_mamba() -> ModelFamily:
    from . import fractal_mamba
    return ModelFamily(fractal_mamba.build, fractal_mamba.parameter_count,
                       fractal_mamba.training_flops_per_token,
                       "fractal Mamba (byte-level; seeded fractal modules + Mamba blocks)",
                       tensor_parallel=False, pipeline_parallel=False)


def _fractalformer() -> ModelFamily:
    from . import fractalformer
    return ModelFamily(fractalformer.build, fractalformer.parameter_count,
                       fractalformer.training_flops_per_token,
                       "FractalFormer (nested self-similar sub-models, trained jointly)",
                       tensor_parallel=False, pipeline_parallel=False)


def _him() -> ModelFamily:
    from . import him
    return ModelFamily(him.build, him.parameter_count, him.training_flops_per_token,
                       "HIM (working memory, reasoning buffer, fast/slow FFN paths)",
                       tensor_parallel=False, pipeline_parallel=False)


def _bsfin() -> ModelFamily:
    from . import bsfin
    return ModelFamily(bsfin.build, bsfin.parameter_count, bsfin.training_flops_per_token,
                       "BSFIN (byte entropy patches, complex interference attention over patches)",
                       tensor_parallel=False, pipeline_parallel=False)


# Lazy factories keep `import model` cheap (megatron-core imports take seconds).
_FAMILIES: dict[str, Callable[[], ModelFamily]] = {
    "mistral": _mistral, "fim_mistral": _fim_mistral, "fractal_mamba": _fractal_mamba,
    "fractalformer": _fractalformer, "him": _him, "bsfin": _bsfin}


def names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise ConfigError(f"model.name={name!r} is not registered (allowed: {', '.join(names())})")
    family = _FAMILIES[name]()
    return replace(family, build=_in_kernel_mode(family.build))


def _in_kernel_mode(build: Callable[[ModelConfig, ParallelConfig], nn.Module]):
    """Every family's build first sets ``model.kernels`` as the process's dispatch mode (Triton
    on CUDA, or the torch references everywhere): one place, whatever the family."""
    def build_in_kernel_mode(cfg: ModelConfig, par: ParallelConfig) -> nn.Module:
        from kernels import dispatch

        dispatch.set_mode(cfg.kernels)
        return build(cfg, par)

    return build_in_kernel_mode
