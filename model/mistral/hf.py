"""Our Mistral <-> transformers' ``MistralForCausalLM``, both ways, in one place: ``export
--format hf`` writes HF checkpoints with it and ``train.init_from=hf:DIR`` reads them.

Names are megatron-core GPTModel's (``decoder.layers.{i}.…``, global layer numbers, no TP split).
Two pairs of HF matrices are fused on our side: ``linear_qkv`` holds, for each KV group in
turn, that group's query heads, then its key head, then its value head (rows
``groups x (heads/groups + 2) x head_dim``), and ``linear_fc1`` is ``[gate; up]``. The rest are
renames. With tied embeddings transformers stores no ``lm_head`` and the output layer is the
embedding.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from model.config import ConfigError, ModelConfig

EMBEDDING, FINAL_NORM, OUTPUT = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                 "output_layer.weight")
_TOP = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight",
        OUTPUT: "lm_head.weight"}
_QKV, _FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
_QKV_HF = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_FC1_HF = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_RENAMED = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "mlp.linear_fc2.weight": "mlp.down_proj.weight",
            "input_layernorm.weight": "input_layernorm.weight",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def our_names(m: ModelConfig) -> list[str]:
    """Every tensor of the whole model (one process, all stages), in our names."""
    names = [EMBEDDING, FINAL_NORM] + ([] if m.tie_embeddings else [OUTPUT])
    for i in range(m.num_layers):
        names += [f"decoder.layers.{i}.{n}" for n in (_QKV, _FC1, *_RENAMED)]
    return names


def hf_names(m: ModelConfig) -> list[str]:
    """Every tensor a transformers checkpoint of this shape holds."""
    names = [_TOP[EMBEDDING], _TOP[FINAL_NORM]] + ([] if m.tie_embeddings else [_TOP[OUTPUT]])
    for i in range(m.num_layers):
        names += [f"model.layers.{i}.{n}" for n in (*_QKV_HF, *_FC1_HF, *_RENAMED.values())]
    return names


def _groups(m: ModelConfig) -> tuple[int, int, int]:
    """(KV groups, query heads per group, head dim)."""
    return (m.num_query_groups, m.num_attention_heads // m.num_query_groups,
            m.hidden_size // m.num_attention_heads)


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our whole-model state dict -> transformers' names and matrices (copies)."""
    groups, per_group, d = _groups(m)
    out = {_TOP[EMBEDDING]: state[EMBEDDING], _TOP[FINAL_NORM]: state[FINAL_NORM]}
    if not m.tie_embeddings:
        out[_TOP[OUTPUT]] = state[OUTPUT]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + _QKV].view(groups, per_group + 2, d, m.hidden_size)
        q, k, v = qkv[:, :per_group], qkv[:, per_group], qkv[:, per_group + 1]
        out.update({dst + name: t.reshape(-1, m.hidden_size) for name, t in zip(_QKV_HF, (q, k, v))})
        out.update({dst + name: t for name, t in zip(_FC1_HF, state[src + _FC1].chunk(2, dim=0))})
        out.update({dst + hf: state[src + ours] for ours, hf in _RENAMED.items()})
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf(key: str, read: Callable[[str], torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """Our tensor ``key`` (global layer numbering, whole, unsplit) made from the HF tensors
    ``read(name)`` returns; each is read only when needed, so a caller can stream one at a time."""
    if key in _TOP:
        return read(_TOP[EMBEDDING] if key == OUTPUT and m.tie_embeddings else _TOP[key])
    match = _LAYER.match(key)
    if match is None:
        raise KeyError(f"{key} is not a Mistral tensor")
    layer, name = f"model.layers.{match.group(1)}.", match.group(2)
    if name == _QKV:
        groups, per_group, d = _groups(m)
        q, k, v = (read(layer + n) for n in _QKV_HF)
        return torch.cat([q.view(groups, per_group, d, -1), k.view(groups, 1, d, -1),
                          v.view(groups, 1, d, -1)], dim=1).reshape(-1, q.shape[-1])
    if name == _FC1:
        return torch.cat([read(layer + n) for n in _FC1_HF], dim=0)
    return read(layer + _RENAMED[name])


def hf_config(m: ModelConfig):
    """transformers' ``MistralConfig`` of our model config."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        sliding_window=m.sliding_window or None, tie_word_embeddings=m.tie_embeddings,
        architectures=["MistralForCausalLM"])


# config.json field -> our model.<field> that must equal it
_FIELDS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
           "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
           "intermediate_size": "ffn_hidden_size", "vocab_size": "vocab_size",
           "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "sliding_window": "sliding_window",
           "tie_word_embeddings": "tie_embeddings"}


def check_config(hf, m: ModelConfig, where: str) -> None:
    """A transformers ``MistralConfig`` against our model config: the first difference is one
    ConfigError line naming the field, both values and the ``--set`` that matches the checkpoint
    (``where`` names the checkpoint). ``model.vocab_size=0`` (not resolved yet) is not compared."""
    rope = dict(getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hf.rope_theta})
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{where}: rope_type={rope['rope_type']!r}; only plain RoPE (rope_type "
                          "'default', no scaling) is implemented")
    if hf.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act={hf.hidden_act!r}; our MLP is SwiGLU (silu)")
    ours_head_dim = m.hidden_size // m.num_attention_heads
    if (hf.head_dim or hf.hidden_size // hf.num_attention_heads) != ours_head_dim:
        raise ConfigError(f"{where}: head_dim={hf.head_dim}, but ours is model.hidden_size / "
                          f"model.num_attention_heads = {ours_head_dim}; a head_dim other than "
                          "hidden_size / num_attention_heads is not supported")
    values = {**{f: getattr(hf, f) for f in _FIELDS if f != "rope_theta"},
              "rope_theta": rope["rope_theta"], "sliding_window": hf.sliding_window or 0}
    for field, ours in _FIELDS.items():
        theirs, mine = values[field], getattr(m, ours)
        if ours == "vocab_size" and mine == 0:
            continue
        if theirs != mine:
            shown = str(theirs).lower() if isinstance(theirs, bool) else theirs
            raise ConfigError(f"{where}: config.json has {field}={theirs}, but model.{ours}={mine}; "
                              f"use --set model.{ours}={shown}")
