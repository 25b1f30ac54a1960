"""The global batch across a resume: micro batch x grad accumulation x data-parallel size.

A run resumed on another number of ranks (a requeued Slurm job given fewer nodes) would
otherwise change its optimization silently: more or fewer sequences per update under the same
learning-rate schedule. It is kept, by adjusting ``train.grad_accum`` when
``train.keep_global_batch`` asks for it, or refused with the values and what to set.
"""
from __future__ import annotations

from pathlib import Path

from pretrain.core.checkpoint import COMPLETE, CheckpointError
from pretrain.core.config import RunConfig, load_config


def saved_global_batch(ckpt: Path) -> tuple[int, int, int]:
    """(micro batch, grad accumulation, data-parallel size) a checkpoint was trained with."""
    saved = load_config(ckpt / "config.yaml")
    marker = dict(item.split("=", 1) for item in (ckpt / COMPLETE).read_text().split())
    dp = int(marker["world_size"]) // (int(marker["tp"]) * int(marker["pp"]))
    return saved.train.micro_batch_size, saved.train.grad_accum, dp


def keep_global_batch(cfg: RunConfig, ckpt: Path, dp: int) -> str | None:
    """Check (or, with ``train.keep_global_batch``, restore by setting ``train.grad_accum``) that
    this run's global batch is the checkpoint's; returns a line to print when it adjusted."""
    micro, accum, old_dp = saved_global_batch(ckpt)
    t = cfg.train
    want = micro * accum * old_dp
    if t.micro_batch_size * t.grad_accum * dp == want:
        return None
    what = (f"{ckpt} trained with a global batch of {micro} x {accum} x {old_dp} = {want} sequences "
            f"(micro batch x grad accumulation x data-parallel size); this run has "
            f"{t.micro_batch_size} x {t.grad_accum} x {dp} = {t.micro_batch_size * t.grad_accum * dp}")
    fits = want % (t.micro_batch_size * dp) == 0
    if not t.keep_global_batch or not fits:
        fix = (f"set train.grad_accum={want // (t.micro_batch_size * dp)} (or train.keep_global_batch=true)"
               if fits else f"no grad accumulation gives {want} with micro batch {t.micro_batch_size} on "
                            f"{dp} data-parallel ranks: change train.micro_batch_size")
        raise CheckpointError(f"{what}: {fix}")
    old = t.grad_accum
    t.grad_accum = want // (t.micro_batch_size * dp)
    return (f"global batch kept at {want} sequences: train.grad_accum {old} -> {t.grad_accum} for "
            f"{dp} data-parallel rank(s) (the checkpoint had {old_dp})")
