"""`python -m pretrain tune`: Ray Tune over the real trainer.

Each trial is a function trainable that runs ``trainer.train`` on the base config plus the
trial's sampled keys (any dotted config key), reports validation bpb/loss from the trainer's own
evaluations, and hands Ray the trainer's own checkpoint directory with every report. A trial
restored by PBT/PB2 (exploit: another trial's checkpoint, explore: mutated keys) resumes that
checkpoint with its new values (`engine.reapply_optimizer_settings`); every such start from
another trial's checkpoint is recorded as an exploit event. Schedulers: PBT, PB2, ASHA, FIFO.
Results (``--out``): Ray's experiment directory (every trial's config, metrics and checkpoints;
``--resume`` continues it through ``Tuner.restore``), ``summary.md``, ``summary.json``,
``best_config.yaml`` and ``curves.png``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from .config import ConfigError, _build, load_config, save_config
from .layout_search import LayoutSearchSpec

EXPERIMENT = "experiment"


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

    def validate(self) -> "TuneSpec":
        if self.layout_search.enabled:
            self._validate_layout_search()
        elif not self.search_space:
            raise ConfigError("search_space: list at least one key to tune")
        for i, dim in enumerate(self.search_space):
            dim.validate(f"search_space[{i}] ({dim.key})")
        if self.num_samples < 1 or self.cpus_per_trial <= 0:
            raise ConfigError("num_samples must be >= 1 and cpus_per_trial > 0")
        # every key must exist and every bound must be a valid value for it
        for dim in self.search_space:
            probes = dim.values if dim.distribution == "choice" else [dim.low, dim.high]
            for value in probes:
                trial_config(self, {dim.key: _scalar(value)}, "runs/tune-check")
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
    from .layout_search import SETTINGS

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


def _layout_searcher(spec: TuneSpec):
    from ray.tune.search import ConcurrencyLimiter

    from model import get_family

    from .layout_search import FimLayoutSearcher
    from .trainer import dataset_tokenizer, resolve_vocab

    base = trial_config(spec, {}, "runs/tune-check")
    resolve_vocab(base, dataset_tokenizer(base)["vocab_size"])
    family = get_family("fim_mistral")

    def flops_of(layout: list[dict]) -> float:
        cfg = trial_config(spec, {"model.fim.layers": layout}, "runs/tune-check")
        cfg.model.vocab_size = base.model.vocab_size
        return family.training_flops_per_token(cfg.model)

    searcher = FimLayoutSearcher(spec.layout_search, base.model.num_layers, default_indices(spec, base),
                                 flops_of, spec.seed, metric=spec.metric)
    return searcher, ConcurrencyLimiter(searcher, max_concurrent=spec.layout_search.max_concurrent)


def _scalar(value):
    return yaml.safe_load(value) if isinstance(value, str) else value


def load_spec(path: str | Path) -> TuneSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune config not found: {path}")
    return _build(TuneSpec, yaml.safe_load(path.read_text()) or {}, "").validate()


def trial_config(spec: TuneSpec, params: dict, run_dir: str, cpus: float | None = None):
    """The run config of one trial: base + overrides + sampled keys; evaluation and checkpoint
    together (a report carries the checkpoint of its step), one checkpoint kept."""
    root = Path(__file__).resolve().parents[1]
    sets = [*spec.overrides, *(f"{k}={v}" for k, v in params.items())]
    if "optim.lr" in params and "optim.min_lr" not in params:
        # keep the schedule's shape: min_lr stays the same fraction of the (sampled) peak LR
        base = load_config(root / spec.base, spec.overrides).optim
        sets.append(f"optim.min_lr={float(params['optim.lr']) * base.min_lr / base.lr}")
    cfg = load_config(root / spec.base, sets)
    t = cfg.train
    if t.eval_every <= 0:
        raise ConfigError("train.eval_every must be > 0 for tune: trials report at evaluations")
    t.checkpoint_every, t.keep_last, t.run_dir = t.eval_every, 1, run_dir
    if not Path(cfg.data.path).is_absolute():
        cfg.data.path = str(root / cfg.data.path)
    cfg.log.progress, cfg.log.wandb = False, False
    if cpus is not None:
        t.threads = max(1, int(cpus))
    return cfg


def _search_space(spec: TuneSpec) -> dict:
    from ray import tune

    space = {}
    for dim in spec.search_space:
        if dim.distribution == "choice":
            space[dim.key] = tune.choice([_scalar(v) for v in dim.values])
        elif dim.distribution == "randint":
            space[dim.key] = tune.randint(int(dim.low), int(dim.high) + 1)
        else:
            space[dim.key] = getattr(tune, dim.distribution)(dim.low, dim.high)
    return space


def _scheduler(spec: TuneSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    if s.name == "asha":
        return ASHAScheduler(grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.name == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        bounds = {d.key: [d.low, d.high] for d in spec.search_space if d.distribution != "choice"}
        if not bounds:
            raise ConfigError("scheduler pb2 needs at least one numeric search_space key")
        return PB2(perturbation_interval=s.perturbation_interval, synch=s.synch,
                   quantile_fraction=s.quantile_fraction, hyperparam_bounds=bounds)
    return PopulationBasedTraining(perturbation_interval=s.perturbation_interval, synch=s.synch,
                                   quantile_fraction=s.quantile_fraction,
                                   resample_probability=s.resample_probability,
                                   hyperparam_mutations=_search_space(spec),
                                   custom_explore_fn=ClipToSearchSpace(spec.search_space))


class ClipToSearchSpace:
    """PBT's explore step multiplies a value by 0.8 or 1.2 without looking at the search space's
    bounds (beta1 0.91 -> 1.09 crashes the trial): clip every numeric key back into [low, high]."""

    def __init__(self, dims: list[SearchDim]):
        self.bounds = {d.key: (d.low, d.high, d.distribution == "randint")
                       for d in dims if d.distribution != "choice"}

    def __call__(self, config: dict) -> dict:
        for key, (low, high, integer) in self.bounds.items():
            if key in config:
                value = min(max(config[key], low), high)
                config[key] = int(round(value)) if integer else value
        return config


def run_trial(params: dict, spec: TuneSpec, out_dir: str) -> None:
    """The function trainable: one trainer run in OUT/trials/<trial id>, restored from Ray's
    checkpoint when given (OUT must be on a filesystem every node sees)."""
    from ray import tune

    from .trainer import EXIT_OK, train

    context = tune.get_context()
    trial_dir = Path(out_dir) / "trials" / context.get_trial_id()
    run_dir = trial_dir / "run"
    cfg = trial_config(spec, params, str(run_dir), spec.cpus_per_trial)
    ckpt_dir = run_dir / "checkpoints"
    restored = tune.get_checkpoint()
    shutil.rmtree(ckpt_dir, ignore_errors=True)   # Ray's checkpoint, or none: a fresh start
    if restored is not None:
        with restored.as_directory() as source:
            shutil.copytree(source, ckpt_dir)
        origin = json.loads((ckpt_dir / "origin.json").read_text())
        if origin["trial"] != context.get_trial_id():
            with open(trial_dir / "exploits.jsonl", "a") as f:
                f.write(json.dumps({"trial": context.get_trial_id(), "cloned_from": origin["trial"],
                                    "at_step": origin["step"], "config": params}) + "\n")

    def report(step: int, result: dict, checkpoint: Path | None) -> None:
        metrics = {"bpb": result["bpb"], "loss": result["loss"], "step": step}
        if checkpoint is None:
            tune.report(metrics)
            return
        (checkpoint.parent / "origin.json").write_text(
            json.dumps({"trial": context.get_trial_id(), "step": step}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint.parent)))

    status = train(cfg, resume="auto", on_eval=report)
    if status != EXIT_OK:
        raise RuntimeError(f"trainer exited with status {status} in {run_dir}")


def run(config: str, out: str, address: str | None = None, resume: bool = False,
        num_cpus: int | None = None) -> dict:
    import ray
    from ray import tune

    spec = load_spec(config)
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
            os.environ["RAY_AUTH_MODE"] = "token"  # the cluster then requires the token from drivers
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=str(Path("/tmp") / "pretrain-ray"))
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        print(f"ray: {len(nodes)} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs; "
              f"{spec.num_samples} trials x {spec.cpus_per_trial:g} CPU, scheduler {spec.scheduler.name}",
              flush=True)
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec, out_dir=str(out_dir)),
                                        {"cpu": spec.cpus_per_trial})
        experiment = out_dir / EXPERIMENT
        if resume:
            if not tune.Tuner.can_restore(str(experiment)):
                raise ConfigError(f"--resume: no restorable experiment in {experiment}")
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
        else:
            if experiment.exists():
                raise ConfigError(f"{experiment} exists: pass --resume to continue it, or another --out")
            layout_searcher, search_alg = None, _seeded_searcher(spec.seed)
            if spec.layout_search.enabled:
                layout_searcher, search_alg = _layout_searcher(spec)
            tuner = tune.Tuner(
                trainable,
                param_space={} if layout_searcher is not None else _search_space(spec),
                tune_config=tune.TuneConfig(metric=spec.metric, mode="min", num_samples=spec.num_samples,
                                            scheduler=_scheduler(spec), search_alg=search_alg),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out_dir), verbose=1,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    from .tune_report import write_summary
    layout = None
    if spec.layout_search.enabled and not resume:
        layout = {"history": layout_searcher.history,
                  "policy_choice": layout_searcher.policy.layout(layout_searcher.policy.greedy())}
        history = layout_searcher.history
        default = next((h for h in history if h["default"]), None)
        if spec.layout_search.confirm_seeds > 0 and history and default is not None:
            from .layout_search import confirm
            chosen = max(history, key=lambda h: h["reward"])
            layout["confirmation"] = confirm(spec, {"chosen": chosen["layout"], "default": default["layout"]},
                                             out_dir, spec.layout_search.confirm_seeds)
    return write_summary(spec, config, grid, out_dir, layout)


def _seeded_searcher(seed: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


def save_best(spec: TuneSpec, params: dict, path: Path) -> None:
    save_config(trial_config(spec, params, "runs/tuned"), path)

