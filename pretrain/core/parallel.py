"""Process-group setup, in one place: torchrun / Slurm / single-process env -> torch.distributed
-> megatron parallel_state (TP x PP x DP) -> CPU shim where there is no CUDA."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.core.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_launcher() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) from torchrun, else Slurm's srun; None for a lone process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return rank, world, local
    return None


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """Check the layout against the world and the model; return the data-parallel size."""
    from model import get_family

    tp, pp, m = cfg.parallel.tp, cfg.parallel.pp, cfg.model
    family = get_family(m.name)
    supports = family.supports
    for kind, size, supported in (("tp", tp, supports.tensor_parallel), ("pp", pp, supports.pipeline_parallel)):
        if size > 1 and not supported:
            raise ConfigError(f"parallel.{kind}={size}: model.name={m.name} supports data parallelism "
                              f"and ZeRO only (its layers are not sharded and it has no pipeline "
                              f"stages); set parallel.{kind}=1 and scale with more data-parallel ranks")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x parallel.pp "
                          f"= {tp} x {pp}; launch a multiple of {tp * pp} processes")
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        raise ConfigError(f"parallel.tp={tp} must divide model.num_attention_heads="
                          f"{m.num_attention_heads} and model.num_query_groups={m.num_query_groups}")
    if m.vocab_size % tp:
        raise ConfigError(f"parallel.tp={tp} must divide model.vocab_size={m.vocab_size}")
    if m.num_layers % pp:
        raise ConfigError(f"parallel.pp={pp} must divide model.num_layers={m.num_layers}")
    if cfg.parallel.sequence_parallel and not torch.cuda.is_available():
        raise ConfigError("parallel.sequence_parallel=true needs CUDA: megatron's sequence-parallel "
                          "reduce-scatter has no gloo implementation; leave it false on CPU")
    return world_size // (tp * pp)


def setup(cfg: RunConfig) -> Layout:
    launched = _env_from_launcher()
    rank, world, local_rank = launched or (0, 1, 0)
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed asserts it is set
    dp = validate_layout(cfg, world)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A lone process gets a private rendezvous on a free port, leaving the env untouched.
        init = None if launched else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank,
                                world_size=world)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(cfg.train.seed)
    else:
        from pretrain.core.cpu_shim import install_cpu_shim
        install_cpu_shim(cfg.train.seed, tp_rank)
    return Layout(rank=rank, world_size=world, local_rank=local_rank, tp=cfg.parallel.tp,
                  pp=cfg.parallel.pp, dp=dp, dp_rank=parallel_state.get_data_parallel_rank(),
                  tp_rank=tp_rank, pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                  device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMpu:
    """The ``mpu`` interface DeepSpeed expects, answered by megatron's parallel_state.

    DeepSpeed's "model parallel" is megatron's TP x PP group: gradient norms are summed over it,
    and its rank names the checkpoint files, ``mp_rank_{pp_rank * tp + tp_rank:02d}``, so that
    pipeline stages do not overwrite each other. Tensor-parallel queries pass through."""

    @staticmethod
    def get_model_parallel_rank() -> int:
        from megatron.core import parallel_state as ps

        return (ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size()
                + ps.get_tensor_model_parallel_rank())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()

    def __getattr__(self, name):
        from megatron.core import parallel_state as ps

        return getattr(ps, name)
