"""Typed run configuration: YAML file + ``--set dotted.key=value`` overrides, validated on load.

Every section is a dataclass: ``model`` and ``parallel`` are defined with the models
(model/config.py, each family's section in its folder), the others here. Unknown keys, wrong
types and out-of-range values raise ``ConfigError`` with one line naming the dotted key and what
is allowed, so a typo in a 1,000-GPU job fails at submit time rather than silently falling back
to a default.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from model import get_family
from model.config import ConfigError, ModelConfig, ParallelConfig, require_positive, section_types

__all__ = ["ConfigError", "DataConfig", "LogConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
           "QControlConfig", "RunConfig", "TrainConfig", "build_typed", "load_config", "parse_override",
           "save_config"]


@dataclass
class DataConfig:
    """The dataset and how to read it. ``path`` may be a URL (http(s)://, s3://, any fsspec
    protocol); the store settings below become the process's defaults when the config loads."""
    path: str = "data/shakespeare"     # written by `python -m data_pipeline prepare`: a directory or URL
    tokenizer: Literal["auto", "bytes", "sentencepiece", "hf"] = "auto"  # expected; auto = the dataset's
    num_workers: int = 0               # DataLoader worker processes per rank (0: in-process)
    shuffle_buffer: int = 0            # documents in the seeded shuffle buffer (0: shard order only)
    # stream: a batch is consecutive windows of the packed documents; shuffled: each shard's
    # windows in a seeded permutation, rows from anywhere in it (data_pipeline/loader.py)
    window_order: Literal["stream", "shuffled"] = "stream"
    mask_documents: bool = False       # mask attention across document boundaries in packed rows
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt/missing shard: fail, or skip and count
    s3_endpoint: str = ""              # S3-compatible endpoint URL ("" = $AWS_ENDPOINT_URL or AWS)
    timeout_s: float = 30.0            # per request to a remote store
    retries: int = 5                   # retries of a failed remote read (connection, timeout, 5xx, 429)
    retry_backoff_s: float = 0.5       # first wait between retries, doubled each time (at most 10 s)
    cache_dir: str = ""                # local cache of verified remote shards ("" = none)
    cache_gb: float = 10.0             # its bound; least recently used shards are evicted

    def validate(self) -> None:
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ConfigError("data.shuffle_buffer and data.num_workers must be >= 0")
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@", self.path):
            raise ConfigError("data.path must not hold credentials (user:password@): configs are saved with "
                              "every run; use the AWS environment variables or files, or ~/.netrc")
        if self.retries < 0 or self.timeout_s <= 0 or self.retry_backoff_s < 0 or self.cache_gb <= 0:
            raise ConfigError("data.retries and data.retry_backoff_s must be >= 0, data.timeout_s and "
                              "data.cache_gb > 0")

    def store_options(self):
        from data_pipeline.storage import StoreOptions

        return StoreOptions(s3_endpoint=self.s3_endpoint, timeout_s=self.timeout_s, retries=self.retries,
                            backoff_s=self.retry_backoff_s, cache_dir=self.cache_dir, cache_gb=self.cache_gb)


@dataclass
class QControlConfig:
    """Q-learning control of LR and momentum (pretrain/core/qcontrol.py): every ``every`` steps the
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
    eval_at_start: bool = True         # false: no step-0 evaluation (a faster start)
    log_every: int = 10
    threads: int = 0                   # torch intra-op threads; 0 = all cores
    compile: bool = False              # torch.compile the model (first steps pay the compile time)
    peak_tflops: float = 0.0           # per-device peak for MFU; 0 = a matmul probe at start
    max_skipped_steps: int = 5         # abort after this many updates in a row skipped as non-finite
    # "hf:DIR": a fresh run starts from a transformers MistralForCausalLM checkpoint (config.json +
    # safetensors; checked against the model section when training starts, not when a saved
    # config is read back); a resume loads its own checkpoint instead (pretrain/core/hf_init.py)
    init_from: str = ""
    # on a resume under another data-parallel size: set grad_accum so that micro batch x grad
    # accum x data-parallel size stays the checkpoint's (false: such a change is refused)
    keep_global_batch: bool = False

    def validate(self) -> None:
        require_positive(self, "train", ["steps", "micro_batch_size", "grad_accum", "eval_batches", "log_every",
                                  "max_skipped_steps"])
        for key in ("checkpoint_every", "keep_last", "eval_every", "threads", "peak_tflops"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if self.init_from and (not self.init_from.startswith("hf:") or self.init_from == "hf:"):
            raise ConfigError(f"train.init_from={self.init_from!r} must be hf:DIR (a transformers "
                              "checkpoint directory) or empty")


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
        """Each section's own fields first, then the rules across sections: the family's own
        (its section against the shared model fields), then what it supports."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        family = get_family(self.model.name)
        family.validate(self.model)
        supports, name = family.supports, self.model.name
        if self.parallel.sequence_parallel and not supports.sequence_parallel:
            raise ConfigError(f"parallel.sequence_parallel=true is not supported by {name}; leave it false")
        if self.data.mask_documents and not supports.document_masking:
            raise ConfigError(f"data.mask_documents=true is not supported by {name} (its sequence "
                              "mixing has no document boundaries); leave it false")
        if self.model.sliding_window and not supports.sliding_window:
            raise ConfigError(f"model.sliding_window is not supported by {name} (full causal "
                              "attention); set it to 0")
        if self.train.init_from and not supports.hf_export:
            raise ConfigError(f"train.init_from: transformers checkpoints load into the mistral "
                              f"baseline, not model.name={name}")
        if self.optim.param_groups == "multispeed" and not supports.speed_groups:
            raise ConfigError(f"optim.param_groups=multispeed: {name} defines no speed groups; use standard")
        if self.train.compile and (self.parallel.pp > 1 or self.parallel.zero_stage == 3):
            raise ConfigError("train.compile=true needs parallel.pp=1 and parallel.zero_stage <= 2: "
                              "pipeline stages take their input through set_input_tensor and ZeRO-3 "
                              "gathers parameters in module hooks, neither of which torch.compile "
                              "traces; leave it false for those layouts")
        return self

    def set_token_budget(self, tokens: int, evaluations: int) -> None:
        """Train for ``tokens`` tokens in whole steps with ``evaluations`` evenly spaced: runs of
        different batch or context shapes then get the same budget and evaluate at the same fractions."""
        t = self.train
        t.steps = max(1, round(tokens / (t.micro_batch_size * t.grad_accum * self.model.seq_length)))
        t.eval_every = max(1, t.steps // evaluations)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name).to_dict() if f.name == "model"
                else dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


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
        return [build_typed(item, v, f"{key}[{i}]") if dataclasses.is_dataclass(item)
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


def build_typed(cls: type, values: dict, prefix: str) -> Any:
    """A config dataclass from a YAML mapping: unknown keys and ill-typed values are errors naming
    the dotted key (``prefix``); nested dataclasses are built the same way (tune specs use it too)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    sections = {}
    if cls is ModelConfig:   # its family sections sit beside its fields (model.fim, model.him, ...)
        sections = section_types()
        known = (known - {"sections"}) | set(sections)
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (allowed in "
                          f"{prefix or 'the top level'}: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in sections:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_typed(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    built = cls(**kwargs)
    for name, section in sections.items():
        if name in values:
            built.sections[name] = build_typed(section, values[name] or {}, f"{prefix}.{name}")
    return built


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
    cfg = build_typed(RunConfig, tree, "").validate()
    from data_pipeline.storage import configure

    configure(cfg.data.store_options())  # every loader of this process reads data.path this way
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
