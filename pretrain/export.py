"""Checkpoint -> one consolidated state dict: ``safetensors`` (our parameter names, TP merged)
or ``hf`` (config.json + model.safetensors that transformers' MistralForCausalLM loads).

DeepSpeed writes one ``mp_rank_XX_model_states.pt`` per model-parallel rank, XX = pipeline
stage x TP size + TP rank; under ZeRO 0-2 each holds that rank's full module weights. Under
ZeRO-3 those are empty placeholders and the weights live in the partitioned optimizer files, consolidated with DeepSpeed's zero_to_fp32
(which handles one TP rank; ZeRO-3 with TP > 1 is refused).

Merging TP shards follows megatron's layers: column-parallel weights (fused QKV, fc1, the
vocab-parallel embedding and output layer) are split on dim 0, row-parallel ones (attention
output projection, fc2) on dim 1, norms are replicated. fc1 holds [gate; up] per rank, so its
halves are merged separately. The fused QKV is laid out per KV group as [q heads, k, v].
Pipeline stages hold consecutive layers numbered from 0 on each stage: they are renumbered
(stage x layers per stage + local index); the first stage holds the embedding, the last the
final norm and output layer.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, resolve
from .config import RunConfig, load_config

_COLUMN = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def _weights(module_state: dict) -> dict[str, torch.Tensor]:
    """Our wrapper's state dict -> GPTModel parameter names, megatron's extra state dropped."""
    return {k.removeprefix("gpt."): v for k, v in module_state.items() if not k.endswith("_extra_state")}


def load_shards(ckpt_dir: Path, tag: str) -> list[dict[str, torch.Tensor]]:
    """Module state dict of each model-parallel rank, keys without the 'gpt.' wrapper prefix."""
    files = sorted((ckpt_dir / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt_dir / tag} holds no mp_rank_*_model_states.pt files")
    shards = []
    for f in files:
        shards.append(_weights(torch.load(f, map_location="cpu", weights_only=False)["module"]))
    if any(v.numel() == 0 for v in shards[0].values()):  # ZeRO-3: weights are partitioned
        if len(shards) > 1:
            raise CheckpointError("exporting a ZeRO-3 checkpoint with tensor parallelism > 1 is "
                                  "not supported; train with parallel.zero_stage <= 2 or tp = 1")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        shards = [_weights(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))]
    return shards


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return {k: v.clone() for k, v in shards[0].items()}
    merged = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if key.endswith("linear_fc1.weight"):
            gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
            merged[key] = torch.cat([*gates, *ups], dim=0)
        elif key.endswith(_COLUMN):
            merged[key] = torch.cat(parts, dim=0)
        elif key.endswith(_ROW):
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = parts[0].clone()  # replicated (norms)
    return merged


def _renumber_layers(state: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    def rename(key: str) -> str:
        return re.sub(r"^decoder\.layers\.(\d+)\.",
                      lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", key)
    return {rename(k): v for k, v in state.items()}


def consolidate(ckpt_dir: Path, tag: str, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The whole model's state dict from a checkpoint of any layout (TP merged, stages joined)."""
    shards = load_shards(ckpt_dir, tag)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if len(shards) != tp * pp:
        raise CheckpointError(f"{ckpt_dir / tag} holds {len(shards)} model-parallel shards, but its "
                              f"config says tp={tp} x pp={pp}")
    per_stage = cfg.model.num_layers // pp
    state: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        merged = merge_tensor_parallel(shards[stage * tp:(stage + 1) * tp])
        state.update(_renumber_layers(merged, stage * per_stage))
    return state


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


def locate(ckpt: str) -> tuple[Path, str]:
    """A run directory, its checkpoints/ directory (-> latest) or one step_* dir -> (dir, tag)."""
    path = Path(ckpt)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    found = resolve(str(path), path)
    if found is None:
        raise CheckpointError(f"--ckpt {ckpt}: no checkpoint found")
    return found


def export(ckpt: str, out: str, fmt: str = "safetensors") -> Path:
    from safetensors.torch import save_file

    ckpt_dir, tag = locate(ckpt)
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    if cfg.model.name != "mistral" and fmt == "hf":
        raise CheckpointError(f"--format hf is defined for the mistral baseline, not {cfg.model.name}")
    state = consolidate(ckpt_dir, tag, cfg)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        hf_config(cfg).save_pretrained(out_dir)
        state = to_hf(state, cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "source": str(ckpt_dir / tag)})
    (out_dir / "config.yaml").write_text((ckpt_dir / tag / "config.yaml").read_text())
    return out_dir
