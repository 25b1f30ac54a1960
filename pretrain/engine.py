"""DeepSpeed engine: ZeRO stage from the config, AdamW, warmup + cosine, gradient clipping."""
from __future__ import annotations

import math
import os

import torch

from .config import RunConfig
from .parallel import Layout, MegatronMpu


def lr_lambda(cfg: RunConfig):
    """Multiplier of optim.lr at a step: linear warmup, then cosine down to optim.min_lr."""
    o, total = cfg.optim, cfg.train.steps
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips an update whose gradients are not all finite and reports it through
    ``overflow``, the attribute DeepSpeed's engine reads from its fp16 optimizers: the engine then
    leaves the LR schedule alone and ``was_step_applied()`` is False. Used without ZeRO only:
    ZeRO's optimizer makes the same check on its partitioned gradients. Tensor and pipeline
    ranks hold different parameters, so they agree on the verdict over megatron's model-parallel
    group (data-parallel ranks already share reduced gradients)."""

    overflow = False

    def step(self, closure=None):
        import torch.distributed as dist
        from megatron.core import parallel_state

        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), device=device)
        if grads:  # one multi-tensor kernel: a norm is non-finite iff an element is
            bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float()
        group = parallel_state.get_model_parallel_group(check_initialized=False)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        self.overflow = bool(bad.item())
        if self.overflow:
            return None
        return super().step(closure)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases and other vectors alone (standard practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the fused (single-kernel, CPU and CUDA) implementation: the same update as the
    per-parameter loop, several times faster on many small tensors. bench train gives the
    transformers reference this same optimizer."""
    o = cfg.optim
    adamw = SkippingAdamW if cfg.parallel.zero_stage == 0 else torch.optim.AdamW
    return adamw(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                 fused=True)


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
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.parallel.dtype == "bf16":
        # ZeRO's optimizer skips an update with a non-finite gradient norm; for bf16 only if asked.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


def build_engine(cfg: RunConfig, model: torch.nn.Module, layout: Layout):
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, layout), mpu=MegatronMpu(),
        dist_init_required=False)
    if layout.dp == 1 and cfg.parallel.zero_stage == 0:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into a bucket,
        # all-reduce it over that one rank and copy it back, every step.
        engine.enable_backward_allreduce = False
    return engine

