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

import argparse
import json
import os
import shutil
from pathlib import Path

from pretrain.core.config import ConfigError
from pretrain.research.layout_search import FimLayoutSearcher, confirm
from pretrain.research.tune_report import trial_subdir, write_summary
from pretrain.research.tune_spec import (
    EXPERIMENT,
    SearchDim,
    TuneSpec,
    default_indices,
    load_spec,
    trial_config,
    yaml_scalar,
)


def _layout_searcher(spec: TuneSpec):
    from ray.tune.search import ConcurrencyLimiter

    from model import get_family
    from pretrain.core.trainer import dataset_tokenizer, resolve_vocab

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


def _search_space(spec: TuneSpec) -> dict:
    from ray import tune

    space = {}
    for dim in spec.search_space:
        if dim.distribution == "choice":
            space[dim.key] = tune.choice([yaml_scalar(v) for v in dim.values])
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

    from pretrain.core.trainer import EXIT_OK, train

    context = tune.get_context()
    trial_dir = Path(out_dir) / trial_subdir(context.get_trial_id())
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
    layout = None
    if spec.layout_search.enabled and not resume:
        layout = {"history": layout_searcher.history,
                  "policy_choice": layout_searcher.policy.layout(layout_searcher.policy.greedy())}
        history = layout_searcher.history
        default = next((h for h in history if h["default"]), None)
        if spec.layout_search.confirm_seeds > 0 and history and default is not None:
            chosen = max(history, key=lambda h: h["reward"])
            layout["confirmation"] = confirm(spec, {"chosen": chosen["layout"], "default": default["layout"]},
                                             out_dir, spec.layout_search.confirm_seeds)
    return write_summary(spec, config, grid, out_dir, layout)


def _seeded_searcher(seed: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


TUNE_EPILOG = """\
examples:
  python -m pretrain tune --config configs/tune/pbt_tiny.yaml --out runs/tune-pbt
  python -m pretrain tune --config configs/tune/pbt_tiny.yaml --out runs/tune-pbt --resume
  python -m pretrain tune --config configs/tune/demo_tiny.yaml --address auto   # a running cluster
  sbatch --nodes 2 slurm/ray_cluster.sbatch python -m pretrain tune --config ... --address auto

The tune YAML names a base run config, overrides for every trial, the search space (any dotted
config key: loguniform / uniform / randint / choice), the scheduler (pbt, pb2, asha, fifo), the
number of trials and CPUs per trial. Trials report validation bpb at every train.eval_every.
"""

def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tune", help="Ray Tune search over the trainer (PBT, PB2, ASHA)",
        description="Run a Ray Tune search whose trials are real training runs; writes OUT/experiment "
                    "(every trial's config, metrics, checkpoints), OUT/summary.md, summary.json, "
                    "best_config.yaml and curves.png.",
        epilog=TUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="tune YAML (configs/tune/*.yaml)")
    p.add_argument("--out", default="runs/tune", help="results directory (default runs/tune)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (e.g. auto, or host:port; default $RAY_ADDRESS, else a "
                        "local Ray limited to --num-cpus)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray's CPUs (default: all)")
    p.add_argument("--resume", action="store_true", help="continue the experiment in OUT (Tuner.restore)")
    return p


def main(args) -> int:
    summary = run(args.config, args.out, args.address or os.environ.get("RAY_ADDRESS"), args.resume,
                  args.num_cpus)
    best = summary["best"]
    print(f"summary: {Path(args.out) / 'summary.md'}; best val bpb "
          f"{'n/a' if best is None else format(best['bpb'], '.4f')}")
    return 0
