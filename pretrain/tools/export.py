"""`python -m pretrain export`: a checkpoint -> one consolidated state dict, as ``safetensors``
(our parameter names, TP merged; what `generate` and `compress` load) or ``hf`` (config.json +
model.safetensors that transformers' MistralForCausalLM loads). The merge itself is
``pretrain.core.model_dir.consolidate``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model import get_family
from pretrain.core.checkpoint import CheckpointError
from pretrain.core.config import RunConfig, load_config
from pretrain.core.model_dir import CHECKPOINT_HELP, consolidate, locate, save_model_dir


def to_hf(state: dict[str, torch.Tensor], cfg: RunConfig) -> dict[str, torch.Tensor]:
    m = cfg.model
    d = m.hidden_size // m.num_attention_heads
    per_group = m.num_attention_heads // m.num_query_groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = state.get("output_layer.weight", out["model.embed_tokens.weight"])
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].view(
            m.num_query_groups, per_group + 2, d, m.hidden_size)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(-1, m.hidden_size),
            dst + "self_attn.k_proj.weight": qkv[:, per_group].reshape(-1, m.hidden_size),
            dst + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(-1, m.hidden_size),
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
        })
    if m.tie_embeddings:
        del out["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(cfg: RunConfig):
    from transformers import MistralConfig

    m = cfg.model
    return MistralConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        sliding_window=m.sliding_window or None, tie_word_embeddings=m.tie_embeddings,
        architectures=["MistralForCausalLM"])


def export(ckpt: str, out: str, fmt: str = "safetensors") -> Path:
    ckpt_dir, tag = locate(ckpt)
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    if fmt == "hf" and not get_family(cfg.model.name).supports.hf_export:
        raise CheckpointError(f"--format hf is defined for the mistral baseline, not {cfg.model.name}")
    state = consolidate(ckpt_dir, tag, cfg)
    if fmt == "hf":
        state = to_hf(state, cfg)
    out_dir = save_model_dir(out, state, (ckpt_dir / tag / "config.yaml").read_text(), str(ckpt_dir / tag))
    if fmt == "hf":
        hf_config(cfg).save_pretrained(out_dir)
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
