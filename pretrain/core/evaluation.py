"""Validation bits per byte, one definition for the trainer's evaluation and every tool that
scores a model: the validation split in stored order, summed per-token loss over the bytes those
tokens decode to (fair across byte- and token-level models)."""
from __future__ import annotations

import math

import torch
from torch import nn

from data_pipeline.loader import StreamingLoader
from pretrain.core.config import ConfigError, RunConfig
from pretrain.core.steps import model_inputs


def validation_loader(cfg: RunConfig) -> StreamingLoader:
    return StreamingLoader(cfg.data.path, "val", cfg.model.seq_length, cfg.train.micro_batch_size,
                           seed=cfg.train.seed, epochs=1, mask_documents=cfg.data.mask_documents)


def scores(cfg: RunConfig, nll: float, tokens: float, nbytes: float, skip: int = 0) -> dict:
    """Summed loss (nats), tokens and target bytes -> loss per token and bits per byte; no tokens
    (a split shorter than the batches asked for) is an error naming the split."""
    if tokens == 0:
        past = f" past the first {skip} batches" if skip else ""
        raise ConfigError(f"validation split of {cfg.data.path} is shorter than one batch of "
                          f"{cfg.train.micro_batch_size} x {cfg.model.seq_length} tokens{past}")
    return {"loss": nll / tokens, "bpb": nll / math.log(2) / max(nbytes, 1), "eval_tokens": int(tokens)}


@torch.no_grad()
def val_bpb(model: nn.Module, cfg: RunConfig, batches: int, skip: int = 0) -> dict:
    """Scores of a whole model in this process on validation batches [skip, skip + batches)."""
    loader = validation_loader(cfg)
    was_training = model.training
    model.eval()
    nll = tokens = nbytes = 0.0
    for i, batch in zip(range(skip + batches), loader):
        if i >= skip:
            nll += float(model(**model_inputs(batch, torch.device("cpu"))).double().sum())
            tokens += batch["labels"].numel()
            nbytes += float(loader.target_bytes(batch["labels"]).sum())
    model.train(was_training)
    return scores(cfg, nll, tokens, nbytes, skip)
