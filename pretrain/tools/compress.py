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

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from pretrain.core.evaluation import val_bpb
from pretrain.core.model_dir import CHECKPOINT_HELP, save_model_dir
from pretrain.tools.quantize import linear_layers, quantize_int8


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

    from data_pipeline.loader import StreamingLoader
    from pretrain.core.steps import model_inputs
    from pretrain.tools.generate import Generator

    if not 0 <= amount < 1:
        raise ValueError(f"--prune {amount}: a fraction in [0, 1)")
    torch.manual_seed(seed)
    gen = Generator(ckpt)
    model, cfg = gen.model, gen.cfg
    result = {"ckpt": ckpt, "prune": amount, "finetune_steps": steps, "lr": lr, "eval_batches": eval_batches,
              "bpb_trained": val_bpb(model, cfg, eval_batches)["bpb"]}
    print(f"val bpb of the trained model: {result['bpb_trained']:.4f}", flush=True)
    if amount > 0:
        targets = prune(model, amount)
        result["bpb_pruned"] = val_bpb(model, cfg, eval_batches)["bpb"]
        print(f"pruned {amount:.0%} of the linear weights: val bpb {result['bpb_pruned']:.4f}", flush=True)
        if steps > 0:
            data = StreamingLoader(cfg.data.path, "train", cfg.model.seq_length, cfg.train.micro_batch_size,
                                   seed=seed, window_order=cfg.data.window_order)
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
        result["bpb_finetuned"] = val_bpb(model, cfg, eval_batches)["bpb"]
        print(f"after {steps} fine-tuning steps: val bpb {result['bpb_finetuned']:.4f}", flush=True)
    result["linear_sparsity"] = sparsity(model)
    out_dir = save_model_dir(out, model.state_dict(), cfg, ckpt)
    try:
        result["bpb_int8"] = val_bpb(quantize_int8(model, cfg.model), cfg, eval_batches)["bpb"]
        print(f"int8 dynamic quantization: val bpb {result['bpb_int8']:.4f}", flush=True)
    except ValueError as exc:
        result["bpb_int8"], result["int8_error"] = None, str(exc)
    (out_dir / "compress.json").write_text(json.dumps(result, indent=2))
    return result


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compress", help="magnitude pruning + fine-tuning, int8 check -> a model generate loads",
                       description="Global magnitude pruning of the torch.nn.Linear weights, fine-tuning "
                       "of the rest on the run's training split (one process), then the masks are made "
                       "permanent. Writes OUT/model.safetensors, config.yaml and compress.json (val bpb "
                       "trained / pruned / fine-tuned / int8). `generate --ckpt OUT --int8` runs it quantized.")
    p.add_argument("--ckpt", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prune", type=float, default=0.2, help="fraction of linear weights pruned (default 0.2)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps after pruning (default 100)")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning AdamW learning rate (default 3e-4)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per bpb (default 8)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning data order and RNG (default 0)")
    return p


def main(args) -> int:
    run(args.ckpt, args.out, args.prune, args.finetune_steps, args.lr, args.eval_batches, args.seed)
    print(f"wrote {Path(args.out) / 'model.safetensors'} and compress.json")
    return 0
