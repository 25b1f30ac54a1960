"""One optimizer step and one evaluation pass, for both layouts in one place.

Without pipeline parallelism DeepSpeed's engine drives forward, backward and the step (ZeRO 0-3
hook into its backward). With it, megatron-core's 1F1B schedule runs the micro-batches through
the stages, sending activations forward and gradients back; DeepSpeed then reduces gradients
over the data-parallel group and steps (ZeRO <= 1). Every stage reads the same micro-batches
(the loader is keyed by the data-parallel rank), so the document mask is available everywhere;
the last stage's losses are broadcast to the others for logging.

The ``phase/*`` profiler ranges name the parts of a step; ``bench train`` reads them (a few
microseconds each while no profiler runs).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function


def model_inputs(batch: dict, device: torch.device) -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
    if "segment_ids" in batch:
        inputs["segment_ids"] = batch["segment_ids"].to(device)
    return inputs


def _from_last_stage(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return values


def _schedule(engine, micro_batches: list[dict], device, forward_only: bool, poison: bool):
    """megatron's pipeline schedule over this rank's stage; per-micro-batch (mean, sum) of the
    per-token loss, valid on the last stage (zeros elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain.core.cpu_shim import cuda_to_cpu

    def forward_step(data_iterator, model):
        token_loss = model(**model_inputs(next(data_iterator), device))

        def loss_func(output: torch.Tensor):
            loss = output.float().mean()
            if poison:
                loss = loss * float("nan")
            # The schedule divides the returned loss in place by the micro-batch count: clone.
            stats = torch.stack([loss.detach().double(), output.detach().double().sum()])
            return loss, {"stats": stats.clone()}

        return token_loss, loss_func

    seq, mbs = micro_batches[0]["input_ids"].shape[1], micro_batches[0]["input_ids"].shape[0]
    with cuda_to_cpu():
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=engine.module,
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs,
            forward_only=forward_only)
    if results:
        return torch.stack([r["stats"] for r in results]).to(device)
    return torch.zeros(len(micro_batches), 2, dtype=torch.float64, device=device)


def train_step(engine, micro_batches: list[dict], device, pipelined: bool,
               poison: bool = False) -> torch.Tensor:
    """Forward, backward and one optimizer step over the micro-batches of a global step; returns
    each micro-batch's mean loss (detached, on device). ``poison`` makes the loss NaN (fault
    injection for tests and drills)."""
    if not pipelined:
        losses = []
        for batch in micro_batches:
            with record_function("phase/forward"):
                loss = engine(**model_inputs(batch, device)).mean()
                if poison:
                    loss = loss * float("nan")
            with record_function("phase/backward"):
                engine.backward(loss)
            with record_function("phase/optimizer"):
                engine.step()
            losses.append(loss.detach())
        return torch.stack(losses)
    with record_function("phase/forward_backward"):
        stats = _schedule(engine, micro_batches, device, forward_only=False, poison=poison)
    # The schedule ran backward itself: reduce over data parallel, then step once.
    engine.set_gradient_accumulation_boundary(True)
    with record_function("phase/communication"):
        if engine.zero_optimization_stage() == 1:
            engine.optimizer.reduce_gradients(pipeline_parallel=True)
        else:
            engine.allreduce_gradients()
    with record_function("phase/optimizer"):
        engine.step()
    return _from_last_stage(stats[:, 0].contiguous())


@torch.no_grad()
def eval_losses(engine, batch: dict, device, pipelined: bool) -> torch.Tensor:
    """Summed per-token loss of one batch (fp64 scalar, on every pipeline stage)."""
    if not pipelined:
        return engine(**model_inputs(batch, device)).double().sum()
    stats = _schedule(engine, [batch], device, forward_only=True, poison=False)
    return _from_last_stage(stats[0, 1].contiguous())
