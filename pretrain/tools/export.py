"""`python -m pretrain export`: a checkpoint -> one consolidated state dict, as ``safetensors``
(our parameter names, TP merged; what `generate` and `compress` load) or ``hf`` (config.json +
model.safetensors that transformers' MistralForCausalLM loads). The merge itself is
``pretrain.core.model_dir.consolidate``, the name and layout mapping to transformers'
``model/mistral/hf.py`` (which ``train.init_from`` reads back with).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model import get_family
from model.mistral.hf import hf_config, to_hf
from pretrain.core.checkpoint import CheckpointError
from pretrain.core.config import load_config
from pretrain.core.model_dir import CHECKPOINT_HELP, consolidate, locate, save_model_dir


def export(ckpt: str, out: str, fmt: str = "safetensors") -> Path:
    ckpt_dir, tag = locate(ckpt)
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    if fmt == "hf" and not get_family(cfg.model.name).supports.hf_export:
        raise CheckpointError(f"--format hf is defined for the mistral baseline, not {cfg.model.name}")
    state = consolidate(ckpt_dir, tag, cfg)
    if fmt == "hf":
        state = to_hf(state, cfg.model)
    out_dir = save_model_dir(out, state, (ckpt_dir / tag / "config.yaml").read_text(), str(ckpt_dir / tag))
    if fmt == "hf":
        hf_config(cfg.model).save_pretrained(out_dir)
    return out_dir


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="consolidate a checkpoint into one safetensors file (or HF)",
                       description="Merge ZeRO and tensor-parallel shards of a checkpoint into one "
                                   "state dict. --format safetensors keeps our parameter names; "
                                   "--format hf writes config.json + model.safetensors that "
                                   "transformers.MistralForCausalLM.from_pretrained loads.")
    p.add_argument("--ckpt", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    return p


def main(args) -> int:
    print(f"wrote {export(args.ckpt, args.out, args.format)}")
    return 0
