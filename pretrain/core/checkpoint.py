"""Checkpoints: DeepSpeed's ZeRO layout + per-rank extras, published atomically.

Layout under ``<run_dir>/checkpoints``::

    step_00000200/            DeepSpeed files (mp_rank_*_model_states.pt, *_optim_states.pt)
        extra_rank00000.pt    this rank's data-loader state and RNG states
        config.yaml           the resolved run config
        COMPLETE              written after every rank finished
    latest                    text: the tag of the newest COMPLETE checkpoint

``latest`` is replaced with os.replace only after COMPLETE exists, so a process killed while
writing leaves it on the previous complete checkpoint. Incomplete directories are removed at
the next save. COMPLETE records the layout; ``reshard.load`` loads a checkpoint of another one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.core.config import RunConfig, save_config

LATEST = "latest"
COMPLETE = "COMPLETE"
# Fault injection for tests and drills: SIGKILL this process after the shard files of this step
# are written and before the checkpoint is marked complete (a crash mid-checkpoint).
KILL_MID_CHECKPOINT_ENV = "PRETRAIN_KILL_MID_CHECKPOINT_AT_STEP"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag / COMPLETE).is_file():
        raise CheckpointError(f"{pointer} names {tag!r}, which is not a complete checkpoint; "
                              f"point it at an existing step_* directory that holds {COMPLETE}")
    return tag


def save(engine, ckpt_dir: Path, step: int, client_state: dict, extra: dict, cfg: RunConfig,
         keep_last: int) -> Path:
    """Collective: every rank calls it."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tag
        if stale.exists():  # a crashed earlier attempt at the same step
            shutil.rmtree(stale)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    tmp = ckpt_dir / tag / f"extra_rank{rank:05d}.pt.tmp"
    torch.save(extra, tmp)
    os.replace(tmp, ckpt_dir / tag / f"extra_rank{rank:05d}.pt")
    if os.environ.get(KILL_MID_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if rank == 0:
        save_config(cfg, ckpt_dir / tag / "config.yaml")
        (ckpt_dir / tag / COMPLETE).write_text(layout_of(cfg, dist.get_world_size()) + "\n")
        _atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, current=tag)
    dist.barrier()
    return ckpt_dir / tag


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name))
    complete = [t for t in tags if (ckpt_dir / t / COMPLETE).is_file()]
    doomed = [t for t in tags if t not in complete and t != current]
    if keep_last > 0:
        doomed += [t for t in complete[:-keep_last] if t != current]
    for t in doomed:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def resolve(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """``--resume auto|never|PATH`` -> (checkpoints dir, tag) to load, or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        ckpt_dir = run_dir / "checkpoints"
        tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / LATEST).is_file():                 # a checkpoints directory
        return path, latest_tag(path)
    if (path / COMPLETE).is_file():               # one step_* directory
        return path.parent, path.name
    raise CheckpointError(f"--resume {resume}: not a checkpoints directory (no {LATEST}) nor a "
                          f"complete checkpoint directory (no {COMPLETE})")


def layout_of(cfg: RunConfig, world_size: int) -> str:
    """What a checkpoint's shards depend on; recorded in its COMPLETE marker."""
    p = cfg.parallel
    return f"world_size={world_size} tp={p.tp} pp={p.pp} zero_stage={p.zero_stage}"


def read_extra(ckpt_dir: Path, tag: str, rank: int) -> dict:
    """The extra file (data-loader and RNG states) saved by ``rank``."""
    return torch.load(ckpt_dir / tag / f"extra_rank{rank:05d}.pt", weights_only=False)


def load(engine, ckpt_dir: Path, tag: str, layout: str) -> tuple[dict, dict]:
    """Load engine state (model, optimizer, LR schedule) saved under this run's layout; return
    (client_state, this rank's extra). ``layout`` is ``layout_of`` for this run; a checkpoint of
    another layout goes through ``reshard.load``, which calls this one when the layouts agree."""
    saved = (ckpt_dir / tag / COMPLETE).read_text().strip()
    if saved != layout:
        raise CheckpointError(f"{ckpt_dir / tag} was written with layout [{saved}], this run has "
                              f"[{layout}]: load it with pretrain.core.reshard.load")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    return client_state, read_extra(ckpt_dir, tag, dist.get_rank())
