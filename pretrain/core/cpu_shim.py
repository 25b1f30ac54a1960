"""Let megatron-core run without CUDA (gloo, CPU tensors).

Upstream has no CPU path; the failures and fixes are listed in ../shared/FINDINGS.md:
1. the tensor-parallel RNG tracker calls torch.cuda RNG on every attention forward
   -> a tracker that keeps CPU generator states;
2. ``torch.cuda.current_device()`` picks buffer devices (RoPE, GlobalMemoryBuffer, p2p)
   -> it answers "cpu" on a machine without CUDA;
3. pipeline schedules allocate ``device="cuda"`` tensors -> ``cuda_to_cpu()`` remaps them,
   entered only around the schedules (a TorchFunctionMode costs a little on every op);
4. activation recomputation saves and restores the CUDA RNG state -> there is none to keep
   (the CPU generator and the tracker's states are still saved and restored).
Nothing here is installed when CUDA is available.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


class CpuRNGStatesTracker:
    """Megatron's RNG tracker contract (add / fork / get_states / set_states) on the CPU generator."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def cuda_to_cpu():
    """Context manager: tensor factories asked for "cuda" get "cpu" (pipeline schedules)."""
    return _CudaToCpu() if not torch.cuda.is_available() else contextlib.nullcontext()


def install_cpu_shim(seed: int, tp_rank: int = 0) -> None:
    """Idempotent; a no-op when CUDA is available (megatron's own paths are used there)."""
    global _installed
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    if not _installed:
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
        mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
        _installed = True
    tracker = CpuRNGStatesTracker()
    # Same offsets as megatron's model_parallel_cuda_manual_seed: TP ranks differ, DP ranks agree.
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
