"""Typed run configuration: YAML file + ``--set dotted.key=value`` overrides, validated on load.

Every section is a dataclass. Unknown keys, wrong types and out-of-range values raise
``ConfigError`` with one line naming the dotted key and what is allowed, so a typo in a
1,000-GPU job fails at submit time rather than silently falling back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key."""


FIM_BRANCHES = ("local", "hierarchical", "routed")


@dataclass
class FimLayerConfig:
    """One layer's overrides of the model-wide FIM settings (unset keys: the model-wide value)."""
    block_size: Optional[int] = None
    branching: Optional[int] = None
    levels: Optional[int] = None
    top_k: Optional[int] = None
    branches: Optional[str] = None


@dataclass
class FimConfig:
    """FIM attention (model.name=fim_mistral): see model/fim_attention.py for the definitions."""
    block_size: int = 32               # B: leaf block, attended exactly (causally)
    branching: int = 2                 # b: children per unit of the hierarchy
    levels: int = -1                   # hierarchical levels; -1: enough to cover seq_length
    top_k: int = 2                     # routed leaf blocks per query block
    branches: str = "local,hierarchical,routed"  # comma-separated subset; local is required
    pooling: Literal["mean"] = "mean"  # how a unit's keys/values are summarized
    position_embedding: bool = True    # learned embedding per fractal coordinate level, beside RoPE
    layers: list[FimLayerConfig] = field(default_factory=list)  # per layer (index 0 = first layer)

    def validate(self, num_layers: int) -> None:
        if len(self.layers) > num_layers:
            raise ConfigError(f"model.fim.layers has {len(self.layers)} entries but the model has "
                              f"{num_layers} layers")
        for i in range(len(self.layers)):
            self.for_layer(i, where=f"model.fim.layers[{i}]")
        self.for_layer(None, where="model.fim")

    def for_layer(self, index: int | None, where: str = "model.fim") -> FimLayerConfig:
        """Resolved settings of one layer (0-based; None: the model-wide ones), validated."""
        own = self.layers[index] if index is not None and index < len(self.layers) else FimLayerConfig()
        merged = FimLayerConfig(**{f.name: getattr(self, f.name) if getattr(own, f.name) is None
                                   else getattr(own, f.name) for f in dataclasses.fields(own)})
        if merged.block_size <= 0 or merged.branching < 2 or merged.top_k < 0 or merged.levels < -1:
            raise ConfigError(f"{where}: need block_size > 0, branching >= 2, top_k >= 0, levels >= -1 "
                              f"(got {merged.block_size}, {merged.branching}, {merged.top_k}, "
                              f"{merged.levels})")
        chosen = [b.strip() for b in merged.branches.split(",") if b.strip()]
        unknown = [b for b in chosen if b not in FIM_BRANCHES]
        if unknown or "local" not in chosen:
            raise ConfigError(f"{where}.branches={merged.branches!r}: a comma-separated subset of "
                              f"{', '.join(FIM_BRANCHES)} that includes local")
        merged.branches = ",".join(chosen)
        return merged


@dataclass
class FractalMambaConfig:
    """model.name=fractal_mamba (model/fractal_mamba.py). Each layer holds ``modules_per_layer``
    fractal modules whose depth and width are drawn from the ranges below by ``architecture_seed``:
    the drawn architecture is a function of this config alone, so a checkpoint rebuilds it."""
    modules_per_layer: int = 2
    depth_min: int = 1                 # fractal depth c: 2^c - 1 linear layers per module
    depth_max: int = 3
    width_min: int = 128               # module width, drawn in multiples of 8
    width_max: int = 256
    drop_path: float = 0.0             # FractalNet local drop-path at each join (training only)
    architecture_seed: int = 0
    state_size: int = 16               # Mamba SSM state per channel
    expand: int = 2                    # Mamba inner width = expand x hidden_size
    conv_kernel: int = 4

    def validate(self) -> None:
        _positive(self, "model.fractal_mamba", ["depth_min", "width_min", "state_size", "expand",
                                                 "conv_kernel"])
        if self.modules_per_layer < 0:
            raise ConfigError("model.fractal_mamba.modules_per_layer must be >= 0")
        if self.depth_max < self.depth_min or self.width_max < self.width_min:
            raise ConfigError("model.fractal_mamba: depth_max >= depth_min and width_max >= width_min")
        if -(-self.width_min // 8) * 8 > self.width_max:
            raise ConfigError(f"model.fractal_mamba: no multiple of 8 in [width_min, width_max] = "
                              f"[{self.width_min}, {self.width_max}] (widths are multiples of 8)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.fractal_mamba.drop_path={self.drop_path} must be in [0, 1)")


@dataclass
class FractalFormerConfig:
    """model.name=fractalformer (model/fractalformer.py): ``levels`` nested levels; every model
    at level l holds ``branching`` models at level l+1, each 1/branching of its width."""
    levels: int = 3                    # level 0: the full model
    branching: int = 2
    level_weights: list[float] = field(default_factory=list)  # joint loss weights; empty: equal
    upstream_residual: bool = False    # add the sub-models' concatenated residual states to their parent's

    def validate(self, model: "ModelConfig") -> None:
        if self.levels < 1 or self.branching < 2:
            raise ConfigError(f"model.fractalformer: need levels >= 1 and branching >= 2 (got "
                              f"{self.levels}, {self.branching})")
        if self.level_weights and (len(self.level_weights) != self.levels
                                   or min(self.level_weights) < 0 or sum(self.level_weights) <= 0):
            raise ConfigError(f"model.fractalformer.level_weights={self.level_weights}: one weight "
                              f">= 0 per level ({self.levels}), not all zero; or empty for equal")
        split = self.branching ** (self.levels - 1)
        head_dim = model.hidden_size // model.num_attention_heads
        for key, value, multiple in (("hidden_size", model.hidden_size, split),
                                     ("ffn_hidden_size", model.ffn_hidden_size, split),
                                     ("hidden_size / num_attention_heads", head_dim, 2 * split)):
            if value % multiple:
                raise ConfigError(f"model.{key}={value} must be divisible by {multiple} for "
                                  f"model.fractalformer levels={self.levels}, branching="
                                  f"{self.branching} (the smallest models' share, even for RoPE)")


@dataclass
class HimConfig:
    """model.name=him (model/him.py). Memory and reasoning buffer advance once per ``chunk_size``
    tokens, so a token only sees states built from earlier chunks (causal)."""
    cognitive: bool = True             # False: the ablation (no gate, memory or reasoning buffer)
    memory_slots: int = 16
    memory_rank: int = 16              # low-rank read/write projections
    reasoning_tokens: int = 64
    reasoning_every: int = 3           # refine the shared buffer after every 3rd layer
    reasoning_momentum: float = 0.9    # moving average: buffer = m x buffer + (1 - m) x refined
    chunk_size: int = 64
    decoder_tokens: int = 64           # learned tokens every position cross-attends to before the head
    memory_sparsity_weight: float = 0.01
    reasoning_diversity_weight: float = 0.01
    routing_balance_weight: float = 0.01

    def validate(self) -> None:
        for key in ("memory_slots", "memory_rank", "reasoning_tokens", "reasoning_every", "chunk_size",
                    "decoder_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.him.{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.reasoning_momentum < 1:
            raise ConfigError(f"model.him.reasoning_momentum={self.reasoning_momentum} must be in [0, 1)")
        for key in ("memory_sparsity_weight", "reasoning_diversity_weight", "routing_balance_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.him.{key} must be >= 0")


@dataclass
class BsfinConfig:
    """model.name=bsfin (model/bsfin.py): bytes -> entropy patches -> local encoder -> complex
    interference stack over patches (width model.hidden_size, model.num_layers layers,
    model.num_attention_heads heads, FFN model.ffn_hidden_size) -> local byte decoder."""
    patching: Literal["window", "model"] = "window"   # entropy source: sliding-window Shannon, or a byte LM
    entropy_model: str = ""            # patching=model: an export/compress dir or checkpoint of a byte-level model
    entropy_window: int = 16           # patching=window: bytes in the histogram
    threshold: float = 3.0             # bits (relative: the rise over the previous byte's entropy)
    relative: bool = False
    min_patch: int = 2
    max_patch: int = 12
    local_hidden: int = 128            # byte encoder / decoder width
    local_heads: int = 4
    encoder_layers: int = 1
    decoder_layers: int = 2
    ngram_sizes: list[int] = field(default_factory=lambda: [3, 4, 5])   # hashed n-gram features; empty: none
    ngram_buckets: int = 4096
    score_mode: Literal["quantum", "classical"] = "quantum"
    rope: bool = True
    entangle: bool = True
    complex_to_real: Literal["concat", "magnitude"] = "concat"
    memory_dim: int = 0                # width of the patch memory the decoder reads (0: local_hidden)
    flops_patch_bytes: float = 4.0     # mean patch length assumed by the closed-form FLOPs (training logs the real one)

    def validate(self) -> None:
        for key in ("entropy_window", "min_patch", "max_patch", "local_hidden", "local_heads", "encoder_layers",
                    "decoder_layers", "ngram_buckets"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.bsfin.{key}={getattr(self, key)} must be >= 1")
        if self.min_patch > self.max_patch:
            raise ConfigError(f"model.bsfin.min_patch={self.min_patch} must be <= max_patch={self.max_patch}")
        if self.local_hidden % self.local_heads:
            raise ConfigError(f"model.bsfin.local_hidden={self.local_hidden} must be divisible by local_heads")
        if any(n < 2 for n in self.ngram_sizes):
            raise ConfigError(f"model.bsfin.ngram_sizes={self.ngram_sizes}: n-grams need n >= 2")
        if self.patching == "model" and not self.entropy_model:
            raise ConfigError("model.bsfin.patching=model needs model.bsfin.entropy_model (a byte-level model dir)")
        if self.flops_patch_bytes < 1 or self.memory_dim < 0:
            raise ConfigError("model.bsfin.flops_patch_bytes must be >= 1 and memory_dim >= 0")


@dataclass
class ModelConfig:
    name: str = "mistral"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: int = 2          # KV heads (GQA); equal to heads means plain MHA
    ffn_hidden_size: int = 768
    vocab_size: int = 0                # 0: taken from the dataset's tokenizer, padded
    seq_length: int = 256
    sliding_window: int = 0            # 0: full causal attention
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    attention_backend: Literal["sdpa", "reference"] = "sdpa"
    # auto: fused Triton kernels (kernels/) on CUDA, their torch references elsewhere;
    # reference: the torch references everywhere (to compare numerics or rule a kernel out)
    kernels: Literal["auto", "reference"] = "auto"
    fim: FimConfig = field(default_factory=FimConfig)  # used by model.name=fim_mistral
    fractal_mamba: FractalMambaConfig = field(default_factory=FractalMambaConfig)
    fractalformer: FractalFormerConfig = field(default_factory=FractalFormerConfig)
    him: HimConfig = field(default_factory=HimConfig)
    bsfin: BsfinConfig = field(default_factory=BsfinConfig)

    def validate(self) -> None:
        self.fim.validate(self.num_layers)
        self.him.validate()
        self.bsfin.validate()
        self.fractal_mamba.validate()
        if self.name == "fractalformer":
            self.fractalformer.validate(self)
        _positive(self, "model", ["num_layers", "hidden_size", "num_attention_heads",
                                  "num_query_groups", "ffn_hidden_size", "seq_length"])
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be "
                              f"divisible by model.num_query_groups={self.num_query_groups}")
        if self.sliding_window < 0 or self.vocab_size < 0:
            raise ConfigError("model.sliding_window and model.vocab_size must be >= 0")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_attention_heads must be even (RoPE)")


@dataclass
class DataConfig:
    path: str = "data/shakespeare"     # a directory written by `python -m data_pipeline prepare`
    tokenizer: Literal["auto", "bytes", "sentencepiece"] = "auto"  # expected; auto = the dataset's
    num_workers: int = 0               # DataLoader worker processes per rank (0: in-process)
    shuffle_buffer: int = 0            # documents in the seeded shuffle buffer (0: shard order only)
    mask_documents: bool = False       # mask attention across document boundaries in packed rows
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt/missing shard: fail, or skip and count

    def validate(self) -> None:
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ConfigError("data.shuffle_buffer and data.num_workers must be >= 0")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    dtype: Literal["fp32", "bf16"] = "fp32"
    recompute: bool = False            # activation checkpointing: recompute each layer in backward
    sequence_parallel: bool = False    # megatron sequence parallelism (needs tp > 1 and CUDA)

    def validate(self) -> None:
        _positive(self, "parallel", ["tp", "pp"])
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} is invalid (allowed: 0, 1, 2, 3)")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.pp={self.pp} needs parallel.zero_stage 0 or 1, not {self.zero_stage}: "
                "ZeRO-2/3 partition gradients inside DeepSpeed's backward, which a pipeline schedule "
                "bypasses (DeepSpeed's own pipeline engine has the same limit)")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")


@dataclass
class QControlConfig:
    """Q-learning control of LR and momentum (pretrain/qcontrol.py): every ``every`` steps the
    controller reads the loss trend, the gradient-norm variation and its current LR/momentum,
    takes an action that scales them within the bounds, and learns from the reward (loss
    improvement minus ``stability_weight`` x gradient-norm variation)."""
    enabled: bool = False
    every: int = 10                    # steps per decision: the window state and reward are read over
    lr_scale_min: float = 0.1          # bounds of the factor applied on top of the LR schedule
    lr_scale_max: float = 4.0
    momentum_min: float = 0.8          # bounds of beta1 (AdamW) or momentum (SGD)
    momentum_max: float = 0.99
    epsilon: float = 0.3               # exploration rate at the first decision
    epsilon_decay: float = 0.97        # multiplied in after every decision
    epsilon_min: float = 0.02
    alpha: float = 0.2                 # Q-table learning rate
    gamma: float = 0.9                 # discount
    stability_weight: float = 0.5
    seed: int = 0                      # the controller's own RNG (exploration, ties)

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("optim.qcontrol.every must be >= 1")
        if not 0 < self.lr_scale_min <= 1 <= self.lr_scale_max:
            raise ConfigError("optim.qcontrol: need 0 < lr_scale_min <= 1 <= lr_scale_max")
        if not 0 <= self.momentum_min <= self.momentum_max < 1:
            raise ConfigError("optim.qcontrol: need 0 <= momentum_min <= momentum_max < 1")
        for key in ("epsilon", "epsilon_decay", "epsilon_min", "alpha", "gamma"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"optim.qcontrol.{key}={getattr(self, key)} must be in [0, 1]")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0             # 0 disables clipping
    # lion: lion-pytorch (beta1, beta2 as its betas); sgd: SGD with momentum beta1 (with
    # qcontrol.enabled: the BSFIN design's "EnhancedSGD")
    name: Literal["adamw", "lion", "sgd"] = "adamw"
    schedule: Literal["cosine", "onecycle"] = "cosine"  # onecycle: pct_start/div factors below, no warmup_steps/min_lr
    onecycle_pct_start: float = 0.1
    onecycle_div_factor: float = 25.0          # start at lr / 25
    onecycle_final_div_factor: float = 1000.0  # end at lr / 25 / 1000
    param_groups: Literal["standard", "multispeed"] = "standard"  # multispeed: the model's speed groups
    qcontrol: QControlConfig = field(default_factory=QControlConfig)

    def validate(self) -> None:
        self.qcontrol.validate()
        q = self.qcontrol
        if q.enabled and not q.momentum_min <= self.beta1 <= q.momentum_max:
            raise ConfigError(f"optim.beta1={self.beta1} must lie within optim.qcontrol's momentum "
                              f"bounds [{self.qcontrol.momentum_min}, {self.qcontrol.momentum_max}]")
        if not (self.lr > 0 and 0 <= self.min_lr and (self.min_lr <= self.lr or self.schedule == "onecycle")):
            raise ConfigError("optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.weight_decay, optim.grad_clip must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 < self.onecycle_pct_start < 1 or self.onecycle_div_factor < 1 or self.onecycle_final_div_factor < 1:
            raise ConfigError("optim.onecycle_pct_start must be in (0, 1) and the div factors >= 1")


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 16
    grad_accum: int = 1
    seed: int = 1234
    run_dir: str = "runs/mistral_tiny"
    checkpoint_every: int = 200        # 0: only at the end and on signals
    keep_last: int = 2                 # checkpoints kept on disk (0 keeps all)
    eval_every: int = 100              # 0: only at start and end
    eval_batches: int = 8
    log_every: int = 10
    threads: int = 0                   # torch intra-op threads; 0 = all cores
    compile: bool = False              # torch.compile the model (first steps pay the compile time)
    peak_tflops: float = 0.0           # per-device peak for MFU; 0 = a matmul probe at start
    max_skipped_steps: int = 5         # abort after this many updates in a row skipped as non-finite

    def validate(self) -> None:
        _positive(self, "train", ["steps", "micro_batch_size", "grad_accum", "eval_batches", "log_every",
                                  "max_skipped_steps"])
        for key in ("checkpoint_every", "keep_last", "eval_every", "threads", "peak_tflops"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")


@dataclass
class LogConfig:
    wandb: bool = True                 # always offline unless WANDB_MODE says otherwise
    wandb_project: str = "fractal-pretrain"
    progress: bool = True              # tqdm progress bar on rank 0

    def validate(self) -> None:
        pass


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "RunConfig":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if self.model.name == "fim_mistral" and self.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel=true is not supported by fim_mistral yet (its "
                              "position embedding is added to the unsplit sequence); leave it false")
        if self.model.name in ("fractal_mamba", "fractalformer", "him", "bsfin") and self.data.mask_documents:
            raise ConfigError(f"data.mask_documents=true is not supported by {self.model.name} (its "
                              "sequence mixing has no document boundaries); leave it false")
        if self.model.name in ("fractalformer", "him", "bsfin") and self.model.sliding_window:
            raise ConfigError(f"model.sliding_window is not supported by {self.model.name} (full causal "
                              "attention); set it to 0")
        if self.model.name == "fim_mistral" and self.data.mask_documents:
            raise ConfigError("data.mask_documents=true is not supported by fim_mistral: its summaries "
                              "and routed blocks would need per-document bounds; leave it false")
        if self.train.compile and (self.parallel.pp > 1 or self.parallel.zero_stage == 3):
            raise ConfigError("train.compile=true needs parallel.pp=1 and parallel.zero_stage <= 2: "
                              "pipeline stages take their input through set_input_tensor and ZeRO-3 "
                              "gathers parameters in module hooks, neither of which torch.compile "
                              "traces; leave it false for those layouts")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(obj: Any, section: str, keys: list[str]) -> None:
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ConfigError(f"{section}.{key}={getattr(obj, key)} must be > 0")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check one leaf value against its annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is invalid (allowed: {', '.join(map(str, allowed))})")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, [a for a in typing.get_args(annotation) if a is not type(None)][0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(annotation)
        return [_build(item, v, f"{key}[{i}]") if dataclasses.is_dataclass(item)
                else _coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {annotation!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (allowed in "
                          f"{prefix or 'the top level'}: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=10' -> (['train', 'steps'], 10); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return parts, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    tree = apply_overrides(tree, overrides or [])
    return _build(RunConfig, tree, "").validate()


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
