"""Model directories and whole models in one process: a checkpoint of any layout consolidated
into one state dict, the ``model.safetensors`` + ``config.yaml`` directory that export, compress
and continual write (and generate loads), and building a loaded model with its pretrained parts.

DeepSpeed writes one ``mp_rank_XX_model_states.pt`` per model-parallel rank, XX = pipeline
stage x TP size + TP rank; under ZeRO 0-2 each holds that rank's full module weights. Under
ZeRO-3 those are empty placeholders and the weights live in the partitioned optimizer files,
consolidated with DeepSpeed's zero_to_fp32 (which handles one TP rank; ZeRO-3 with TP > 1 is
refused).

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
from torch import nn

from model import get_family
from model.hooks import PretrainedParts
from pretrain.core.checkpoint import CheckpointError, resolve
from pretrain.core.config import RunConfig, load_config, save_config

MODEL_FILE = "model.safetensors"
CHECKPOINT_HELP = "a run directory, its checkpoints/ directory (uses 'latest') or one step_* directory"

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


def split_tensor_parallel(key: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of a whole-model tensor: the inverse of merge_tensor_parallel."""
    if tp == 1:
        return full
    if key.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if key.endswith(_COLUMN):
        return full.chunk(tp, dim=0)[rank]
    if key.endswith(_ROW):
        return full.chunk(tp, dim=1)[rank]
    return full  # replicated (norms)


def whole_model_name(key: str, layer_offset: int) -> str:
    """A stage's parameter name (our wrapper's 'gpt.' prefix allowed) -> its whole-model name."""
    return re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", key.removeprefix("gpt."))


def _renumber_layers(state: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    return {whole_model_name(k, offset): v for k, v in state.items()}


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


def locate(ckpt: str) -> tuple[Path, str]:
    """A run directory, its checkpoints/ directory (-> latest) or one step_* dir -> (dir, tag)."""
    path = Path(ckpt)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    found = resolve(str(path), path)
    if found is None:
        raise CheckpointError(f"--ckpt {ckpt}: no checkpoint found")
    return found


def load_run_config(path: str) -> RunConfig:
    """The run config of a training checkpoint or a model directory, without its weights."""
    if (Path(path) / MODEL_FILE).is_file():
        return load_config(Path(path) / "config.yaml")
    ckpt_dir, tag = locate(path)
    return load_config(ckpt_dir / tag / "config.yaml")


def load_state(path: str) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(run config, whole-model state dict) from a training checkpoint of any layout, or from a
    model directory (model.safetensors + config.yaml)."""
    cfg = load_run_config(path)
    exported = Path(path) / MODEL_FILE
    if exported.is_file():
        from safetensors.torch import load_file

        return cfg, load_file(str(exported))
    return cfg, consolidate(*locate(path), cfg)


def save_model_dir(out: str | Path, state: dict[str, torch.Tensor], cfg: RunConfig | str,
                   source: str) -> Path:
    """Write a model directory: ``state`` as model.safetensors and the run config beside it
    (a RunConfig, or a config.yaml's text kept as written)."""
    from safetensors.torch import save_file

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / MODEL_FILE),
              metadata={"format": "pt", "source": source})
    if isinstance(cfg, str):
        (out_dir / "config.yaml").write_text(cfg)
    else:
        save_config(cfg, out_dir / "config.yaml")
    return out_dir


def build_model(cfg: RunConfig) -> nn.Module:
    """The family's model for this rank's part of the layout, with any pretrained parts it
    names (PretrainedParts) loaded and attached."""
    family = get_family(cfg.model.name)
    model = family.build(cfg.model, cfg.parallel)
    if family.supports.pretrained_parts:
        assert isinstance(model, PretrainedParts)
        for name, path in model.pretrained_parts().items():
            part_cfg, part = load_model(path)
            model.attach_pretrained(name, part, part_cfg.model)
    return model


def build_single_process(cfg: RunConfig) -> nn.Module:
    """The whole model in this process (no model parallelism, nothing to recompute). Only the
    families built on megatron-core need its parallel state (a gloo group of one); the plain-torch
    ones skip it, and the ~220 MB of resident memory its imports cost."""
    from pretrain.core import parallel

    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = 1, 1, 0
    cfg.parallel.sequence_parallel = cfg.parallel.recompute = False
    supports = get_family(cfg.model.name).supports
    if supports.tensor_parallel or supports.pipeline_parallel:
        parallel.setup(cfg)
    return build_model(cfg)


def load_model(path: str) -> tuple[RunConfig, nn.Module]:
    """(run config, the whole model in this process with its weights, in eval mode) from a
    checkpoint of any layout or a model directory."""
    cfg, state = load_state(path)
    model = build_single_process(cfg)
    own = set(model.state_dict())  # export strips the "gpt." prefix of megatron's part
    model.load_state_dict({k if k in own else "gpt." + k: v for k, v in state.items()})
    return cfg, model.eval()
