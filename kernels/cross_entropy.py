"""Per-token cross-entropy over a large vocabulary: ``loss[i] = logsumexp(x[i]) - x[i, label[i]]``.

The Triton kernels walk each row in vocabulary chunks with an online max / sum-exp in fp32, so
half-precision logits are never copied to fp32 (a 128k vocabulary at 8k tokens is 4 GiB in
fp32), and the backward writes the gradient straight into a tensor of the logits' dtype.
Model-parallel (vocabulary-sharded) logits stay with megatron's vocab-parallel loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]``, ``labels [...]`` -> fp32 loss ``[...]``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


@triton.jit
def _ce_fwd(x_ptr, labels_ptr, loss_ptr, lse_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * vocab
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    label = tl.load(labels_ptr + row)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse - tl.load(base + label).to(tl.float32))


@triton.jit
def _ce_bwd(x_ptr, labels_ptr, lse_ptr, dloss_ptr, dx_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * vocab
    lse = tl.load(lse_ptr + row)
    dloss = tl.load(dloss_ptr + row).to(tl.float32)
    label = tl.load(labels_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - (cols == label).to(tl.float32)) * dloss
        tl.store(dx_ptr + offset + cols, grad.to(dx_ptr.dtype.element_ty), mask=mask)


class _CrossEntropyTriton(torch.autograd.Function):
    BLOCK = 4096

    @staticmethod
    def forward(ctx, logits, labels):
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab).contiguous()
        flat_labels = labels.reshape(-1).contiguous()
        rows = x.shape[0]
        loss = torch.empty(rows, device=x.device, dtype=torch.float32)
        lse = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = min(_CrossEntropyTriton.BLOCK, triton.next_power_of_2(vocab))
        _ce_fwd[(rows,)](x, flat_labels, loss, lse, vocab, BLOCK=block)
        ctx.save_for_backward(x, flat_labels, lse)
        ctx.logits_shape = logits.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, dloss):
        x, flat_labels, lse = ctx.saved_tensors
        dx = torch.empty_like(x)
        block = min(_CrossEntropyTriton.BLOCK, triton.next_power_of_2(x.shape[1]))
        _ce_bwd[(x.shape[0],)](x, flat_labels, lse, dloss.reshape(-1).contiguous(), dx,
                               x.shape[1], BLOCK=block)
        return dx.view(ctx.logits_shape), None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (fp32) of unsharded logits; labels must lie in ``[0, V)``."""
    if dispatch.use_triton(logits, labels):
        return _CrossEntropyTriton.apply(logits, labels)
    return cross_entropy_reference(logits, labels)
