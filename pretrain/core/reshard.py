"""Resume a checkpoint under another layout: tensor- and pipeline-parallel sizes, data-parallel
size and ZeRO stage (0-3), at load time, with no conversion step for the user.

Why a converter of our own, built on the export path's merge. DeepSpeed's universal checkpoints
need an offline ``ds_to_universal`` pass, learn tensor parallelism from Megatron-DeepSpeed's
parameter patterns and pipeline stages from its PipelineModule layer files (we run megatron-core's
GPTModel under our own 1F1B schedule: neither applies), and do not load into ZeRO-0's plain
torch optimizer. megatron's dist_checkpointing shards megatron's own optimizer, which we do not
use (DeepSpeed owns it; megatron's DistributedOptimizer fails on CPU). ``model_dir`` already
merges our TP shards and joins our stages, and an optimizer's per-element state (Adam's
``exp_avg``, ``exp_avg_sq``) has its parameter's shape: the same merge gives it exactly.

How. Every rank reads the saved checkpoint into layout-free whole-model tensors per parameter,
under the consolidated names: the fp32 master weight (``param``), each per-element optimizer
state and the step count. Saved ZeRO partitions are read with DeepSpeed's own records
(ZeRO-1/2: ``param_slice_mappings``; ZeRO-3: ``param_shapes`` and zero_to_fp32's per-parameter
partition rule; ZeRO-0: the optimizer's groups, named with ``engine.grouped_names``). The rank
then writes its slice into its engine, built normally for the new layout: the module's
parameters, and the optimizer's masters and state through the engine's own parameter ->
partition mapping (ZeRO-1/2: each parameter's ``_hp_mapping`` fragment addresses; ZeRO-3: its
``grad_position`` in its sub-group's flat partition). The LR schedule, the client state (step,
tokens, skipped-step counters, the log window) and the engine's counters are layout-free and
load as saved. Each rank's extra file (RNG states, the Q-controller) is that of the saved rank at
the same data-parallel, pipeline and tensor-parallel coordinates, modulo the saved sizes.

Limits. A rank reads the saved stages that overlap its own, all their TP and data-parallel
shards, in fp32 (the weights and moments of those stages, once per process). The model and the
optimizer must be the saved ones. The data loader's state is per data-parallel rank: the trainer
loads it as saved when the data layout is unchanged, else re-splits the states of every saved
rank (data_pipeline/reshard.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.core import checkpoint
from pretrain.core.checkpoint import CheckpointError
from pretrain.core.config import RunConfig, load_config
from pretrain.core.engine import grouped_names
from pretrain.core.model_dir import merge_tensor_parallel, split_tensor_parallel, whole_model_name
from pretrain.core.parallel import Layout

# name -> {"param": fp32 master, "exp_avg": ..., "step": ...}: whole-model tensors, any layout
FullState = dict[str, dict[str, torch.Tensor]]
# What DeepSpeed 0.19 writes into a model-states file beside the client state.
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                   "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
                   "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
                   "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions",
                   "ds_config", "ds_version", "universal_checkpoint_info"}


@dataclass(frozen=True)
class Sharding:
    """What a checkpoint's files depend on: the parallel sizes, the ZeRO stage and the dtype
    (ZeRO-0 keeps bf16 runs' fp32 masters in a wrapper of its own)."""
    tp: int
    pp: int
    dp: int
    zero: int
    dtype: str

    def __str__(self) -> str:
        return f"[tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero} {self.dtype}]"

    def rank(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """Global rank at these coordinates: megatron's default order, tp fastest, then dp, pp."""
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)


@dataclass
class Resumed:
    client: dict          # the client state saved with the engine (step, tokens, counters, ...)
    extra: dict           # this rank's extra file: RNG states, Q-controller, data loader state
    resharded: str | None  # the line naming both layouts, when the layout changed


def saved_sharding(ckpt_dir: Path, tag: str, saved_cfg: RunConfig) -> Sharding:
    fields = dict(item.split("=") for item in (ckpt_dir / tag / checkpoint.COMPLETE).read_text().split())
    tp, pp, world = int(fields["tp"]), int(fields["pp"]), int(fields["world_size"])
    return Sharding(tp=tp, pp=pp, dp=world // (tp * pp), zero=int(fields["zero_stage"]),
                    dtype=saved_cfg.parallel.dtype)


def load(engine, ckpt_dir: Path, tag: str, cfg: RunConfig, layout: Layout) -> Resumed:
    """Collective: load ``tag`` into this run's engine, resharding it if it was saved under
    another layout."""
    folder = ckpt_dir / tag
    saved_cfg = load_config(folder / "config.yaml")
    saved = saved_sharding(ckpt_dir, tag, saved_cfg)
    here = Sharding(tp=layout.tp, pp=layout.pp, dp=layout.dp, zero=cfg.parallel.zero_stage,
                    dtype=cfg.parallel.dtype)
    if saved == here:
        client, extra = checkpoint.load(engine, ckpt_dir, tag, checkpoint.layout_of(cfg, layout.world_size))
        return Resumed(client, extra, None)
    for field in ("name", "param_groups"):
        if getattr(saved_cfg.optim, field) != getattr(cfg.optim, field):
            raise CheckpointError(f"{folder} was trained with optim.{field}={getattr(saved_cfg.optim, field)}, "
                                  f"this run has {getattr(cfg.optim, field)}: resharding keeps the optimizer")
    full = read_full_state(folder, saved, saved_cfg, engine.module, layout)
    write_full_state(engine, full, cfg, layout)
    model_states = _model_states(folder, 0)
    engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = model_states["skipped_steps"]
    client = {k: v for k, v in model_states.items() if k not in _DEEPSPEED_KEYS}
    mine = saved.rank(layout.dp_rank % saved.dp, layout.pp_rank % saved.pp, layout.tp_rank % saved.tp)
    extra = checkpoint.read_extra(ckpt_dir, tag, mine)
    return Resumed(client, extra, f"resharding checkpoint {tag} from {saved} to {here}")


# ----------------------------------------------------------------------------- reading

def read_full_state(folder: Path, saved: Sharding, saved_cfg: RunConfig, model: torch.nn.Module,
                    layout: Layout) -> FullState:
    """The whole-model state of the saved stages that overlap this rank's pipeline stage."""
    speed_of = model.speed_groups() if saved_cfg.optim.param_groups == "multispeed" else {}
    layers = saved_cfg.model.num_layers
    mine = range(layout.pp_rank * layers // layout.pp, (layout.pp_rank + 1) * layers // layout.pp)
    full: FullState = {}
    for stage in range(saved.pp):
        theirs = range(stage * layers // saved.pp, (stage + 1) * layers // saved.pp)
        overlaps = (max(mine.start, theirs.start) < min(mine.stop, theirs.stop)
                    or (stage == 0 and layout.pp_rank == 0)                       # the embedding
                    or (stage == saved.pp - 1 and layout.pp_rank == layout.pp - 1))  # norm, head
        if not overlaps:
            continue
        shards = [_read_model_parallel_rank(folder, stage * saved.tp + t, saved, speed_of)
                  for t in range(saved.tp)]
        full.update(_merge(shards, stage * (layers // saved.pp)))
    return full


def _merge(shards: list[FullState], layer_offset: int) -> FullState:
    """One stage's TP shards -> whole-model names and tensors; per-element states merge like
    their parameter, scalars (the step) are the same on every shard."""
    merged: FullState = {}
    for name, entry in shards[0].items():
        merged[whole_model_name(name, layer_offset)] = {
            key: (merge_tensor_parallel([{name: s[name][key]} for s in shards])[name]
                  if _per_element(value) else value)
            for key, value in entry.items()}
    return merged


def _per_element(value) -> bool:
    """A per-element optimizer state (or master weight), as opposed to a scalar such as the step.
    (DeepSpeed's own test; a saved state may be longer than its partition by the padding.)"""
    return torch.is_tensor(value) and value.dim() > 0


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _model_states(folder: Path, mp: int) -> dict:
    for name in (f"mp_rank_{mp:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"):
        if (folder / name).is_file():
            return _load(folder / name)
    raise CheckpointError(f"{folder} holds no model states for model-parallel rank {mp}")


def _optim_states(folder: Path, dp_rank: int, mp: int) -> dict:
    for prefix in ("", "bf16_"):  # DeepSpeed names bf16 runs' files bf16_zero_...
        path = folder / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
        if path.is_file():
            return _load(path)["optimizer_state_dict"]
    raise CheckpointError(f"{folder} holds no ZeRO optimizer states of data-parallel rank {dp_rank}, "
                          f"model-parallel rank {mp}")


def _read_model_parallel_rank(folder: Path, mp: int, saved: Sharding, speed_of: dict) -> FullState:
    """One saved model-parallel rank's parameters (its own names), whole over data parallelism."""
    if saved.zero == 0:
        return _read_zero0(_model_states(folder, mp), speed_of)
    shapes = [dict(group) for group in _model_states(folder, mp)["param_shapes"]]
    partitions = [_optim_states(folder, d, mp) for d in range(saved.dp)]
    return _read_zero3(partitions, shapes) if saved.zero == 3 else _read_zero12(partitions, shapes)


def _read_zero0(model_states: dict, speed_of: dict) -> FullState:
    """ZeRO-0: the module holds the weights (bf16: the optimizer wrapper keeps fp32 masters in
    ``fp32_groups``), a plain torch optimizer state dict the rest, by index in group order."""
    module, optimizer = model_states["module"], model_states["optimizer"]
    masters = optimizer.get("fp32_groups")
    torch_state = optimizer["optimizer_state_dict"] if masters is not None else optimizer
    buffers = set(model_states.get("buffer_names") or [])
    named = [(k, v.dim()) for k, v in module.items() if not k.endswith("_extra_state") and k not in buffers]
    groups = grouped_names(named, speed_of)
    saved_groups = torch_state["param_groups"]
    if [len(names) for _, names in groups] != [len(g["params"]) for g in saved_groups]:
        raise CheckpointError("the saved optimizer's parameter groups do not match the saved module's "
                              "parameters; cannot name its state")
    full: FullState = {}
    for g, (_, names) in enumerate(groups):
        for j, (name, index) in enumerate(zip(names, saved_groups[g]["params"])):
            weight = masters[g][j] if masters is not None else module[name]
            full[name] = {"param": weight.float(), **torch_state["state"].get(index, {})}
    return full


def _read_zero12(partitions: list[dict], shapes: list[dict]) -> FullState:
    """ZeRO-1/2: each data-parallel rank holds a contiguous slice of each group's flat fp32
    master and state; ``param_slice_mappings`` says where each parameter's piece lies."""
    full: FullState = {}
    for g, group in enumerate(shapes):
        flats = [{"param": part["single_partition_of_fp32_groups"][g],
                  **part["base_optimizer_state"]["state"].get(g, {})} for part in partitions]
        scalars = {k: v for k, v in flats[0].items() if not _per_element(v)}  # the group's step
        for name, shape in group.items():
            pieces: dict[str, list[torch.Tensor]] = {}
            for part, flat in zip(partitions, flats):
                fragment = part["param_slice_mappings"][g].get(name)
                if fragment is None:  # no piece of it on this rank
                    continue
                for key, tensor in flat.items():
                    if _per_element(tensor):
                        pieces.setdefault(key, []).append(tensor.narrow(0, fragment.start, fragment.numel))
            full[name] = {**{k: torch.cat(v).view(shape).float() for k, v in pieces.items()}, **scalars}
    return full


def _read_zero3(partitions: list[dict], shapes: list[dict]) -> FullState:
    """ZeRO-3: every parameter is cut into ceil(numel / dp) pieces, one per rank, laid one after
    another in each rank's flat (concatenated over sub-groups) partition, as zero_to_fp32 reads them."""
    flats, scalars = [], []
    for part in partitions:
        state = part["optimizer_state_dict"]["state"]
        groups = part["fp32_flat_groups"]
        keys = [k for k, v in state[0].items() if _per_element(v)]
        flats.append({"param": torch.cat(groups),
                      **{k: torch.cat([state[i][k][:g.numel()] for i, g in enumerate(groups)]) for k in keys}})
        if not scalars:  # the step of each sub-group, and where it begins in the flat partition
            starts = [sum(g.numel() for g in groups[:i]) for i in range(len(groups))]
            scalars = [(start, {k: v for k, v in state[i].items() if not _per_element(v)})
                       for i, start in enumerate(starts)]
    full: FullState = {}
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = math.prod(shape)
        piece = math.ceil(numel / len(partitions))
        full[name] = {key: torch.cat([f[key].narrow(0, offset, piece) for f in flats])[:numel].view(shape).float()
                      for key in flats[0]}
        full[name].update(next(s for start, s in reversed(scalars) if start <= offset))
        offset += piece
    return full


# ----------------------------------------------------------------------------- writing

def write_full_state(engine, full: FullState, cfg: RunConfig, layout: Layout) -> None:
    """Write this rank's slice of ``full`` into its engine: module weights, fp32 masters and the
    optimizer's state, through the engine's own partition mapping."""
    offset = layout.pp_rank * (cfg.model.num_layers // layout.pp)
    names = {id(p): n for n, p in engine.module.named_parameters()}

    def mine(param) -> dict:
        """This rank's entry for ``param``: every tensor in the shape of its (unpartitioned) local tensor."""
        name = whole_model_name(names[id(param)], offset)
        if name not in full:
            raise CheckpointError(f"the checkpoint holds no parameter {name}")
        shape = tuple(getattr(param, "ds_shape", param.shape))
        entry = {}
        for key, value in full[name].items():
            if _per_element(value):
                value = split_tensor_parallel(name, value, layout.tp, layout.tp_rank)
                if tuple(value.shape) != shape:
                    raise CheckpointError(f"{name}: the checkpoint's {key} has shape {tuple(value.shape)} "
                                          f"on this rank, the model {shape}: resume with the saved model config")
            entry[key] = value
        return entry

    stage = engine.zero_optimization_stage()
    with torch.no_grad():
        if stage == 0:
            _write_zero0(engine.optimizer, mine)
        elif stage == 3:
            _write_zero3(engine.optimizer, mine)
        else:
            _write_zero12(engine.optimizer, mine)


def _new_state(entries: list[dict], flat: torch.Tensor) -> dict:
    """A flat partition's optimizer state: zeros for each per-element state (padding stays zero,
    as a fresh optimizer's would; so do the moments of a parameter that never had any), and the
    scalars (the step count, one per group) of the group's first parameter that has them."""
    state = {}
    for entry in entries:
        for key, value in entry.items():
            if key == "param":
                continue
            if _per_element(value):
                state.setdefault(key, torch.zeros_like(flat))
            elif key not in state:
                state[key] = value.clone().to(flat.device) if torch.is_tensor(value) else value
    return state


def _write_zero0(optimizer, mine) -> None:
    """ZeRO-0: the module parameters are the torch optimizer's (bf16: the wrapper's fp32 copies)."""
    if hasattr(optimizer, "fp32_groups"):  # DeepSpeed's bf16 wrapper around the torch optimizer
        pairs, inner = zip(optimizer.fp16_groups, optimizer.fp32_groups), optimizer.optimizer
    else:
        pairs, inner = ((g["params"], g["params"]) for g in optimizer.param_groups), optimizer
    for low, high in pairs:
        for lp, hp in zip(low, high):
            entry = mine(lp)
            lp.copy_(entry["param"])
            hp.copy_(entry["param"])
            state = {k: (v.to(hp.device).clone() if torch.is_tensor(v) else v)
                     for k, v in entry.items() if k != "param"}
            if state:
                inner.state[hp] = state


def _write_zero12(optimizer, mine) -> None:
    """ZeRO-1/2: each parameter's ``_hp_mapping`` says which piece of it (lp fragment) lies where
    in this rank's flat fp32 partition (hp fragment)."""
    for lps, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
        entries = [mine(lp) for lp in lps]
        state = _new_state(entries, flat)
        targets = {"param": flat, **{k: v for k, v in state.items() if _per_element(v)}}
        for lp, entry in zip(lps, entries):
            lp.copy_(entry["param"])
            mapping = lp._hp_mapping
            if mapping is None:  # no piece of it in this rank's partition
                continue
            low, high = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            for key, target in targets.items():
                if key in entry:
                    piece = entry[key].flatten().narrow(0, low.start, low.numel)
                    target.narrow(0, high.start, high.numel).copy_(piece)
        optimizer.optimizer.state[flat] = state


def _write_zero3(optimizer, mine) -> None:
    """ZeRO-3: this rank holds piece ``rank`` of ceil(numel / dp) elements of every parameter, at
    its ``grad_position`` in its sub-group's flat fp32 partition; the module's partitions (and the
    persistent parameters gathered from them) are refreshed from the masters, as DeepSpeed's own
    universal-checkpoint load does."""
    optimizer.checkpoint_event_prologue()
    for i, (params, flat) in enumerate(zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat)):
        entries = [mine(p) for p in params]
        state = _new_state(entries, flat)
        targets = {"param": flat, **{k: v for k, v in state.items() if _per_element(v)}}
        for p, entry in zip(params, entries):
            _, start, numel = optimizer.grad_position[optimizer.get_param_id(p)]
            rank, world = dist.get_rank(p.ds_process_group), dist.get_world_size(p.ds_process_group)
            for key, target in targets.items():
                if key in entry:
                    whole = F.pad(entry[key].flatten(), (0, numel * world - entry[key].numel()))
                    target.narrow(0, start, numel).copy_(whole.narrow(0, rank * numel, numel))
        optimizer.optimizer.state[flat] = state
        optimizer.fp16_partitioned_groups_flat[i].copy_(flat)
    optimizer.checkpoint_event_epilogue()
