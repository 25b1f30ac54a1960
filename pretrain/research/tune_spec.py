"""What a `tune` YAML says (the search space, scheduler, FIM layout search) and the run config
each trial trains, shared by the Ray Tune driver (tune.py), the layout searcher and the reports."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from pretrain.core.config import ConfigError, build_typed, load_config, save_config

EXPERIMENT = "experiment"
SETTINGS = ("block_size", "branching", "top_k", "branches")   # per-layer FIM settings the layout search picks


@dataclass
class LayoutSearchSpec:
    enabled: bool = False
    block_size: list[int] = field(default_factory=lambda: [16, 32, 64])
    branching: list[int] = field(default_factory=lambda: [2, 4])
    top_k: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    branches: list[str] = field(default_factory=lambda: ["local,hierarchical,routed", "local,routed",
                                                           "local,hierarchical"])
    learning_rate: float = 0.5         # policy-gradient step on the logits
    flops_weight: float = 0.1          # bpb traded per doubling of training FLOPs per token
    max_concurrent: int = 2            # trials in flight: the policy learns between batches
    confirm_seeds: int = 0             # after the search: retrain chosen and default with N new seeds


@dataclass
class SearchDim:
    key: str                           # a dotted config key, e.g. optim.lr
    distribution: Literal["loguniform", "uniform", "randint", "choice"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: list[str] = field(default_factory=list)  # choice: YAML scalars

    def validate(self, where: str) -> None:
        if self.distribution == "choice":
            if not self.values:
                raise ConfigError(f"{where}: distribution choice needs values")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(f"{where}: {self.distribution} needs low < high")
        elif self.distribution == "loguniform" and self.low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0")


@dataclass
class SchedulerSpec:
    name: Literal["pbt", "pb2", "asha", "fifo"] = "pbt"
    perturbation_interval: int = 2     # PBT/PB2: evaluations between exploit/explore decisions
    quantile_fraction: float = 0.25    # PBT/PB2: bottom fraction that copies the top fraction
    resample_probability: float = 0.25  # PBT: explore by resampling instead of perturbing
    synch: bool = False                # PBT/PB2: exploit only when every trial reached the same point
    grace_period: int = 1              # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = 2          # ASHA


@dataclass
class TuneSpec:
    base: str                          # a run config YAML, relative to the repository root
    overrides: list[str] = field(default_factory=list)   # --set style, for every trial
    search_space: list[SearchDim] = field(default_factory=list)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    layout_search: LayoutSearchSpec = field(default_factory=LayoutSearchSpec)  # FIM-Mistral only
    metric: Literal["bpb", "loss"] = "bpb"
    num_samples: int = 4
    cpus_per_trial: float = 1.0
    seed: int = 0                      # sampling of the search space and the schedulers' RNG
    # > 0: every trial trains this many tokens (steps from its own batch and context), evaluates
    # `evaluations` times on the base's number of validation tokens, so that a search over
    # micro_batch_size or seq_length is at equal budget and ASHA compares trials at equal
    # fractions of it; 0: the base's steps
    tokens: int = 0
    evaluations: int = 4

    def validate(self) -> "TuneSpec":
        if self.layout_search.enabled:
            self._validate_layout_search()
        elif not self.search_space:
            raise ConfigError("search_space: list at least one key to tune")
        for i, dim in enumerate(self.search_space):
            dim.validate(f"search_space[{i}] ({dim.key})")
        if self.num_samples < 1 or self.cpus_per_trial <= 0:
            raise ConfigError("num_samples must be >= 1 and cpus_per_trial > 0")
        if self.tokens < 0 or self.evaluations < 1:
            raise ConfigError("tokens must be >= 0 (0: the base config's steps) and evaluations >= 1")
        # every key must exist and every bound must be a valid value for it
        for dim in self.search_space:
            probes = dim.values if dim.distribution == "choice" else [dim.low, dim.high]
            for value in probes:
                trial_config(self, {dim.key: yaml_scalar(value)}, "runs/tune-check")
        return self

    def _validate_layout_search(self) -> None:
        if self.search_space:
            raise ConfigError("layout_search.enabled: the layout policy is the searcher; leave "
                              "search_space empty (put fixed keys in overrides)")
        if self.scheduler.name not in ("fifo", "asha"):
            raise ConfigError("layout_search.enabled needs scheduler fifo or asha: PBT would copy "
                              "weights across different layouts")
        cfg = trial_config(self, {}, "runs/tune-check")
        if cfg.model.name != "fim_mistral":
            raise ConfigError(f"layout_search needs a fim_mistral base config, not {cfg.model.name}")
        default_indices(self, cfg)


def default_indices(spec: TuneSpec, cfg) -> list[dict]:
    """The base config's per-layer FIM settings as indices into the layout search's choices."""
    out = []
    for layer in range(cfg.model.num_layers):
        resolved = cfg.model.fim.for_layer(layer)
        indices = {}
        for setting in SETTINGS:
            choices, value = getattr(spec.layout_search, setting), getattr(resolved, setting)
            if value not in choices:
                raise ConfigError(f"layout_search.{setting}={choices} must contain the base config's "
                                  f"value {value!r} (layer {layer}): the default layout is the first trial")
            indices[setting] = choices.index(value)
        out.append(indices)
    return out


def yaml_scalar(value):
    return yaml.safe_load(value) if isinstance(value, str) else value


def load_spec(path: str | Path) -> TuneSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune config not found: {path}")
    return build_typed(TuneSpec, yaml.safe_load(path.read_text()) or {}, "").validate()


def trial_config(spec: TuneSpec, params: dict, run_dir: str, cpus: float | None = None):
    """The run config of one trial: base + overrides + sampled keys; evaluation and checkpoint
    together (a report carries the checkpoint of its step), one checkpoint kept."""
    root = Path(__file__).resolve().parents[2]   # the repository
    sets = [*spec.overrides, *(f"{k}={v}" for k, v in params.items())]
    base = load_config(root / spec.base, spec.overrides)   # before the sampled keys
    if "optim.lr" in params and "optim.min_lr" not in params:
        # keep the schedule's shape: min_lr stays the same fraction of the (sampled) peak LR
        sets.append(f"optim.min_lr={float(params['optim.lr']) * base.optim.min_lr / base.optim.lr}")
    cfg = load_config(root / spec.base, sets)
    t = cfg.train
    if spec.tokens:
        cfg.set_token_budget(spec.tokens, spec.evaluations)
        # the same validation tokens for every shape: the base's eval_batches x its batch
        eval_tokens = base.train.eval_batches * base.train.micro_batch_size * base.model.seq_length
        t.eval_batches = max(1, round(eval_tokens / (t.micro_batch_size * cfg.model.seq_length)))
    if t.eval_every <= 0:
        raise ConfigError("train.eval_every must be > 0 for tune: trials report at evaluations")
    t.checkpoint_every, t.keep_last, t.run_dir = t.eval_every, 1, run_dir
    if not Path(cfg.data.path).is_absolute():
        cfg.data.path = str(root / cfg.data.path)
    cfg.log.progress, cfg.log.wandb = False, False
    if cpus is not None:
        t.threads = max(1, int(cpus))
    return cfg


def save_best(spec: TuneSpec, params: dict, path: Path) -> None:
    save_config(trial_config(spec, params, "runs/tuned"), path)
