"""`python -m pretrain compress`: post-training magnitude pruning with fine-tuning, and int8
dynamic quantization for CPU inference.

Pruning is global and unstructured over the weight matrices of ``torch.nn.Linear`` layers (the
smallest ``--prune`` fraction by magnitude, torch.nn.utils.prune); fine-tuning then trains the
surviving weights on the run's training split, on one process (the masks keep pruned weights
at zero), and the masks are made permanent. Output: ``model.safetensors`` + ``config.yaml``
(what `generate --ckpt OUT [--int8]` loads) and ``compress.json`` with the validation bpb
before pruning, after pruning and after fine-tuning, and of the int8 model.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization (weights int8, activations quantized per batch) of every
    ``nn.Linear``, in place (no second copy of the model at peak memory); a model with a tied
    output head first gets a Linear copy of it (``untie_head``) so that the head, the biggest
    matmul of a small model, is quantized too."""
    if hasattr(model, "untie_head"):
        model.untie_head()
    if not linear_layers(model):
        raise ValueError(f"{type(model).__name__} has no torch.nn.Linear layers to quantize "
                         "(megatron-core's parallel linear layers are not)")
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated, not yet replaced in core
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


@torch.no_grad()
def val_bpb(model: nn.Module, cfg, batches: int) -> float:
    from data_pipeline.loader import StreamingLoader

    from .steps import model_inputs

    loader = StreamingLoader(cfg.data.path, "val", cfg.model.seq_length, cfg.train.micro_batch_size,
                             seed=cfg.train.seed, epochs=1)
    was_training = model.training
    model.eval()
    nll = nbytes = 0.0
    for _, batch in zip(range(batches), loader):
        nll += float(model(**model_inputs(batch, torch.device("cpu"))).double().sum())
        nbytes += float(loader.target_bytes(batch["labels"]).sum())
    model.train(was_training)
    return nll / math.log(2) / max(nbytes, 1.0)


def prune(model: nn.Module, amount: float) -> list[tuple[nn.Module, str]]:
    import torch.nn.utils.prune as torch_prune

    targets = [(m, "weight") for m in linear_layers(model)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
    return targets


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in linear_layers(model)]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


def run(ckpt: str, out: str, amount: float, steps: int, lr: float, eval_batches: int, seed: int) -> dict:
    import torch.nn.utils.prune as torch_prune
    from safetensors.torch import save_file

    from data_pipeline.loader import StreamingLoader

    from .config import save_config
    from .generate import Generator
    from .steps import model_inputs

    if not 0 <= amount < 1:
        raise ValueError(f"--prune {amount}: a fraction in [0, 1)")
    torch.manual_seed(seed)
    gen = Generator(ckpt)
    model, cfg = gen.model, gen.cfg
    result = {"ckpt": ckpt, "prune": amount, "finetune_steps": steps, "lr": lr, "eval_batches": eval_batches,
              "bpb_trained": val_bpb(model, cfg, eval_batches)}
    print(f"val bpb of the trained model: {result['bpb_trained']:.4f}", flush=True)
    if amount > 0:
        targets = prune(model, amount)
        result["bpb_pruned"] = val_bpb(model, cfg, eval_batches)
        print(f"pruned {amount:.0%} of the linear weights: val bpb {result['bpb_pruned']:.4f}", flush=True)
        if steps > 0:
            data = StreamingLoader(cfg.data.path, "train", cfg.model.seq_length, cfg.train.micro_batch_size,
                                   seed=seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            model.train()
            start = time.time()
            for step, batch in zip(range(1, steps + 1), data):
                loss = model(**model_inputs(batch, torch.device("cpu"))).float().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if step % max(1, steps // 10) == 0 or step == steps:
                    print(f"fine-tune step {step}/{steps}: loss {loss.item():.4f} "
                          f"({time.time() - start:.0f} s)", flush=True)
            model.eval()
        for module, name in targets:
            torch_prune.remove(module, name)
        result["bpb_finetuned"] = val_bpb(model, cfg, eval_batches)
        print(f"after {steps} fine-tuning steps: val bpb {result['bpb_finetuned']:.4f}", flush=True)
    result["linear_sparsity"] = sparsity(model)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "source": ckpt})
    save_config(cfg, out_dir / "config.yaml")
    try:
        result["bpb_int8"] = val_bpb(quantize_int8(model), cfg, eval_batches)
        print(f"int8 dynamic quantization: val bpb {result['bpb_int8']:.4f}", flush=True)
    except ValueError as exc:
        result["bpb_int8"], result["int8_error"] = None, str(exc)
    (out_dir / "compress.json").write_text(json.dumps(result, indent=2))
    return result
