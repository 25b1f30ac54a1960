"""Which implementation an op runs: the Triton kernel on CUDA, the torch reference elsewhere.

``model.kernels`` sets the mode for the process when a model is built: ``auto`` (Triton on CUDA
tensors, references otherwise) or ``reference`` (always the torch references, e.g. to compare
numerics or to rule a kernel out). ``triton`` forces the kernels on any device; the tests use it
on CPU under ``TRITON_INTERPRET=1``. Model code calls the ops in this package, never a kernel.
"""
from __future__ import annotations

import torch

MODES = ("auto", "reference", "triton")
_mode = "auto"


def set_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    global _mode
    _mode = mode


def mode() -> str:
    return _mode


def use_triton(*tensors: torch.Tensor) -> bool:
    if _mode == "reference":
        return False
    if _mode == "triton":
        return True
    return all(t.is_cuda for t in tensors)
