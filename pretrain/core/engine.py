"""DeepSpeed engine: ZeRO stage from the config, AdamW or Lion, warmup + cosine or one-cycle LR,
gradient clipping."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from pretrain.core.config import RunConfig
from pretrain.core.parallel import Layout, MegatronMpu


def lr_lambda(cfg: RunConfig, scale: Callable[[], float] | None = None):
    """Multiplier of optim.lr at a step, times ``scale()`` when given (the Q-learning controller's
    LR factor). cosine: linear warmup, then cosine down to optim.min_lr. onecycle (torch's
    OneCycleLR shape): cosine up from lr/div_factor over the first pct_start of the steps, then
    cosine down to lr/div_factor/final_div_factor."""
    o, total = cfg.optim, cfg.train.steps
    floor = o.min_lr / o.lr

    def cosine(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def onecycle(step: int) -> float:
        start, end = 1 / o.onecycle_div_factor, 1 / (o.onecycle_div_factor * o.onecycle_final_div_factor)
        peak = max(1, round(o.onecycle_pct_start * total))
        if step < peak:
            low, high, progress = start, 1.0, step / peak
        else:
            low, high, progress = end, 1.0, 1 - min(1.0, (step - peak) / max(1, total - peak))
        return low + (high - low) * 0.5 * (1 - math.cos(math.pi * progress))

    shape = onecycle if o.schedule == "onecycle" else cosine

    def factor(step: int) -> float:
        return shape(step) * scale() if scale is not None else shape(step)

    return factor


class Skipping:
    """Mixed into the ZeRO-0 optimizers: computes the global gradient norm itself, clips by it,
    and skips an update whose gradients are not all finite.

    A skip is reported through ``overflow`` and the norm through ``_global_grad_norm``, the
    attributes DeepSpeed's engine reads from its own optimizers: the engine then leaves the LR
    schedule alone, ``was_step_applied()`` is False, and ``get_global_grad_norm()`` reports the
    norm. The norm counts tensor-parallel shards on every rank and replicated parameters once
    (on TP rank 0), summed over megatron's TP x PP group, as megatron does. (DeepSpeed's own
    ZeRO-0 clipping counts replicated parameters on model-parallel rank 0 only, which leaves out
    every later pipeline stage's norm weights.) ZeRO >= 1 optimizers do all this themselves."""

    overflow = False

    def __init__(self, params, *, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm = None

    def step(self, closure=None):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        own = [g for p, g in zip(params, grads)
               if tp_rank == 0 or getattr(p, "tensor_model_parallel", False)]
        squares = torch.zeros((), device=grads[0].device if grads else "cpu")
        if own:  # one multi-tensor kernel; a non-finite element makes the norm non-finite
            squares = torch.stack(torch._foreach_norm(own)).float().square().sum()
        group = ps.get_model_parallel_group(check_initialized=False)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(squares, group=group)
        norm = squares.sqrt()
        self._global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            return None
        if self.max_grad_norm > 0 and grads:  # DeepSpeed's formula, without a host sync
            torch._foreach_mul_(grads, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        return super().step(closure)


class SkippingAdamW(Skipping, torch.optim.AdamW):
    pass


class SkippingSGD(Skipping, torch.optim.SGD):
    pass


def _lion():
    from lion_pytorch import Lion

    class SkippingLion(Skipping, Lion):
        pass

    return Lion, SkippingLion


# The HIM design's learning-rate groups (optim.param_groups=multispeed): factors of optim.lr.
SPEED_FACTORS = {"slow": 0.3, "fast": 1.5, "cognitive": 0.5, "standard": 1.0}


def grouped_names(named_dims: list[tuple[str, int]], speed_of: dict[str, str]) -> list[tuple[tuple[str, bool], list[str]]]:
    """The optimizer's parameter groups as ((speed, decays), names), in order, from the trainable
    parameters' (name, ndim) in ``named_parameters`` order; a checkpoint reader uses it to name
    the parameters of a plain optimizer's state, which holds indices only."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, ndim in named_dims:
        groups.setdefault((speed_of.get(name, "standard"), ndim >= 2), []).append(name)
    order = sorted(groups, key=lambda key: (list(SPEED_FACTORS).index(key[0]), not key[1]))
    return [(key, groups[key]) for key in order]


def param_groups(model: torch.nn.Module, weight_decay: float, speeds: bool = False) -> list[dict]:
    """Decay matrices; leave norms, biases and other vectors alone (standard practice). With
    ``speeds`` one pair of groups per speed of ``model.speed_groups()``; every group carries
    its ``lr_factor`` (of optim.lr) and whether it ``decays``."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = grouped_names([(name, p.dim()) for name, p in params.items()],
                           model.speed_groups() if speeds else {})
    return [{"params": [params[n] for n in names], "weight_decay": weight_decay if decays else 0.0,
             "decays": decays, "lr_factor": SPEED_FACTORS[speed], "speed": speed}
            for (speed, decays), names in groups]


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the fused (single-kernel, CPU and CUDA) implementation: the same update as the
    per-parameter loop, several times faster on many small tensors (bench train gives the
    transformers reference this same optimizer); or Lion (lion-pytorch); or SGD with momentum
    ``beta1``. ZeRO-0 gets the skipping/clipping subclass."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, speeds=o.param_groups == "multispeed")
    for group in groups:
        group["lr"] = o.lr * group["lr_factor"]
    clip_here = o.grad_clip if cfg.parallel.dtype == "fp32" else 0.0  # bf16: DeepSpeed's wrapper clips
    if o.name == "lion":
        lion, skipping_lion = _lion()
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2))
        if cfg.parallel.zero_stage > 0:
            return lion(groups, **kwargs)
        return skipping_lion(groups, max_grad_norm=clip_here, **kwargs)
    if o.name == "sgd":
        kwargs = dict(lr=o.lr, momentum=o.beta1)
        return torch.optim.SGD(groups, **kwargs) if cfg.parallel.zero_stage > 0 else \
            SkippingSGD(groups, max_grad_norm=clip_here, **kwargs)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    if cfg.parallel.zero_stage > 0:
        return torch.optim.AdamW(groups, **kwargs)
    return SkippingAdamW(groups, max_grad_norm=clip_here, **kwargs)


def deepspeed_config(cfg: RunConfig, layout: Layout) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * layout.dp,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # torch.optim.AdamW is the client optimizer: fused DeepSpeed ops need a CUDA build.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    # Always explicit: DeepSpeed clips at 1.0 when the key is absent. fp32 ZeRO-0: SkippingAdamW clips.
    deepspeed_clips = cfg.parallel.zero_stage > 0 or cfg.parallel.dtype == "bf16"
    ds["gradient_clipping"] = cfg.optim.grad_clip if deepspeed_clips else 0.0
    if cfg.parallel.dtype == "bf16":
        # ZeRO's optimizer skips an update with a non-finite gradient norm; for bf16 only if asked.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


def build_engine(cfg: RunConfig, model: torch.nn.Module, layout: Layout,
                 lr_scale: Callable[[], float] | None = None):
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, lr_scale))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, layout), mpu=MegatronMpu(),
        dist_init_required=False)
    if layout.dp == 1 and cfg.parallel.zero_stage == 0:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into a bucket,
        # all-reduce it over that one rank and copy it back, every step.
        engine.enable_backward_allreduce = False
    return engine


def set_lr_from_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Each group's LR = its base LR x the schedule at the current step, now (LambdaLR itself
    recomputes only at its next step): after a change of base LR or of the schedule's scale."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def reapply_optimizer_settings(cfg: RunConfig, engine, controller=None) -> None:
    """After loading a checkpoint, the config's optimizer settings win over the saved ones: a run
    resumed with a changed ``optim.*`` (PBT's explore step, a manual LR change) trains with the
    new values from the next step; an unchanged config leaves every value as it was. The LR stays
    on the schedule (``optim.lr`` x the schedule factor at the current step); beta1 is the
    Q-learning controller's momentum where one runs."""
    o, scheduler = cfg.optim, engine.lr_scheduler
    optimizer = scheduler.optimizer
    scheduler.base_lrs = [o.lr * group.get("lr_factor", 1.0) for group in optimizer.param_groups]
    set_lr_from_schedule(scheduler)
    beta1 = controller.momentum if controller is not None else o.beta1
    for index, (group, base) in enumerate(zip(optimizer.param_groups, scheduler.base_lrs)):
        group["initial_lr"] = base
        if "betas" in group:
            group["betas"] = (beta1, o.beta2)
        else:  # SGD
            group["momentum"] = beta1
        if "eps" in group:  # AdamW (Lion has none)
            group["eps"] = o.eps
        if group.get("decays", index == 0):  # checkpoints before "decays": matrices first, then vectors
            group["weight_decay"] = o.weight_decay
