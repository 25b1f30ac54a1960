"""``train.init_from=hf:DIR``: a fresh run starts from a transformers Mistral checkpoint.

DIR is what ``save_pretrained`` writes: ``config.json`` and ``model.safetensors``, or the shards
that ``model.safetensors.index.json`` lists. Its config must describe our model
(``model/mistral/hf.py: check_config``) and it must hold exactly that model's tensors; both are
checked before any process group starts. Each rank then reads only what its pipeline stage
holds, one tensor at a time from the memory-mapped files (a big checkpoint is never loaded whole),
and copies in its tensor-parallel part (``model_dir.split_tensor_parallel``), so every TP/PP
layout starts from the same weights. The trainer does this once, after building the model and
before the DeepSpeed engine (ZeRO partitions and its fp32 master copies then hold the loaded
weights), and only when it does not resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from model.mistral.hf import check_config, from_hf, hf_names
from pretrain.core.config import ConfigError, RunConfig
from pretrain.core.model_dir import split_tensor_parallel, whole_model_name

PREFIX = "hf:"
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class HFCheckpoint:
    """A transformers checkpoint directory; tensors are read by name, each file opened (mapped)
    when one of its tensors is first needed."""

    def __init__(self, directory: Path, where: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self._open: dict[Path, object] = {}
        if (directory / INDEX).is_file():
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / SINGLE).is_file():
            self.files = {name: directory / SINGLE for name in self._handle(directory / SINGLE).keys()}
        else:
            raise ConfigError(f"{where}: {directory} holds neither {SINGLE} nor {INDEX} (write it "
                              "with transformers' save_pretrained)")

    def _handle(self, path: Path):
        if path not in self._open:
            self._open[path] = self._safe_open(str(path), framework="pt")
        return self._open[path]

    def read(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)


def open_checked(cfg: RunConfig) -> HFCheckpoint:
    """The checkpoint ``train.init_from`` names, checked against ``cfg.model``: config.json field
    by field, then the tensor names. Every problem is one ConfigError line."""
    from transformers import MistralConfig

    where = f"train.init_from={cfg.train.init_from}"
    directory = Path(cfg.train.init_from.removeprefix(PREFIX))
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where}: {config_file} not found (a transformers checkpoint directory "
                          "holds config.json and model.safetensors)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "mistral":
        raise ConfigError(f"{where}: config.json has model_type={model_type!r}; only transformers' "
                          "Mistral (MistralForCausalLM) checkpoints can be loaded")
    check_config(MistralConfig.from_json_file(str(config_file)), cfg.model, where)
    checkpoint = HFCheckpoint(directory, where)
    expected = set(hf_names(cfg.model))
    tolerated = {"lm_head.weight"} if cfg.model.tie_embeddings else set()  # a tied copy
    present = {n for n in checkpoint.files if not n.endswith("rotary_emb.inv_freq")}
    for problem, names in (("lacks", expected - present), ("holds unexpected", present - expected - tolerated)):
        if names:
            first = sorted(names)[0]
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ConfigError(f"{where}: the checkpoint {problem} tensor {first}{more}; it is not "
                              "a MistralForCausalLM of this shape")
    return checkpoint


@torch.no_grad()
def load_into(model: nn.Module, cfg: RunConfig, checkpoint: HFCheckpoint) -> int:
    """Copy this rank's part of every parameter from ``checkpoint``; returns how many."""
    from megatron.core import parallel_state

    m = cfg.model
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    offset = parallel_state.get_pipeline_model_parallel_rank() * (m.num_layers // cfg.parallel.pp)
    count = 0
    for name, param in model.named_parameters():
        key = whole_model_name(name, offset)  # global layer number
        part = split_tensor_parallel(key, from_hf(key, checkpoint.read, m), tp, tp_rank)
        if part.shape != param.shape:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: {key} of TP rank {tp_rank} "
                              f"has shape {tuple(part.shape)} in the checkpoint, "
                              f"{tuple(param.shape)} in the model")
        param.copy_(part)
        count += 1
    return count
