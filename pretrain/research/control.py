"""`bench control`: who should drive the learning rate? The fixed warmup-cosine schedule, the
Q-learning controller (`optim.qcontrol`) and PBT, at an equal token budget per model.

The run is the base config and overrides of a PBT tune YAML; every arm trains ``train.steps``
steps of it per seed (the same batches for every arm of a seed: the loader's order depends on
``train.seed`` only). PBT trains a population of ``num_samples`` such models and keeps the one
with the best validation bpb, so it spends ``num_samples`` x the compute of the other arms; the
report says so. Because PBT selects on the first ``train.eval_batches`` validation batches, every
arm's final model is also scored on the next ``heldout_batches`` validation batches, which no
arm selected on: that is the headline number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pretrain.bench import provenance
from pretrain.core.metrics import read_metrics
from pretrain.research import stats
from pretrain.research.compare import ROOT, config_hash, train_run
from pretrain.research.tune_report import trial_subdir
from pretrain.research.tune_spec import TuneSpec, load_spec, trial_config

ARMS = ("schedule", "qcontrol", "pbt")


def _seed_spec(spec: TuneSpec, seed: int) -> TuneSpec:
    return dataclasses.replace(spec, overrides=[*spec.overrides, f"train.seed={seed}"], seed=seed)


def single_run(spec: TuneSpec, seed: int, arm: str, runs_dir: Path) -> Path:
    """Train (or reuse) the schedule or Q-controller run of one seed; returns its run dir."""
    # a seed varies the controller's exploration too, as it varies PBT's search
    params = {"optim.qcontrol.enabled": True, "optim.qcontrol.seed": seed} if arm == "qcontrol" else {}
    cfg = trial_config(_seed_spec(spec, seed), params, "unset")
    cfg.train.checkpoint_every = 0           # only the final checkpoint: nothing resumes mid-way here
    run_dir = runs_dir / f"{arm}-seed{seed}-{config_hash(cfg)}"
    cfg.train.run_dir = str(run_dir)
    train_run(cfg, run_dir)
    return run_dir


def pbt_run(spec: TuneSpec, seed: int, out_dir: Path) -> tuple[Path, dict]:
    """One PBT search (a `pretrain tune` child process, resumed if interrupted); returns the best
    trial's run dir and the search summary."""
    tune_dir = out_dir / f"pbt-seed{seed}"
    summary_path = tune_dir / "summary.json"
    if not summary_path.is_file():
        tune_dir.mkdir(parents=True, exist_ok=True)
        spec_path = tune_dir / "tune.yaml"
        spec_path.write_text(yaml.safe_dump(dataclasses.asdict(_seed_spec(spec, seed)), sort_keys=False))
        cmd = [sys.executable, "-m", "pretrain", "tune", "--config", str(spec_path), "--out", str(tune_dir)]
        if (tune_dir / "experiment").exists():
            cmd.append("--resume")
        print(f"--- PBT seed {seed}: {spec.num_samples} trials", flush=True)
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0 or not summary_path.is_file():
            raise RuntimeError(f"PBT seed {seed} failed (exit code {done.returncode}): {' '.join(cmd)}")
    summary = json.loads(summary_path.read_text())
    if summary["best"] is None:
        raise RuntimeError(f"PBT seed {seed}: no trial finished ({summary_path})")
    return tune_dir / trial_subdir(summary["best"]["trial"]) / "run", summary


def heldout_bpb(run_dir: Path, skip: int, batches: int) -> dict:
    """Bits per byte of the run's final model on validation batches [skip, skip + batches) in
    stored order: past those the trainer evaluated (and PBT selected) on."""
    from pretrain.core.evaluation import val_bpb
    from pretrain.tools.generate import Generator

    gen = Generator(str(run_dir))
    result = val_bpb(gen.model, gen.cfg, batches, skip=skip)
    return {"bpb": result["bpb"], "loss": result["loss"], "tokens": result["eval_tokens"]}


def _run_record(run_dir: Path, heldout: dict, steps: int) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    val = [r for r in records if r.get("split") == "val"]
    decisions = [r for r in records if r.get("split") == "qcontrol"]
    if not val or val[-1]["step"] != steps:
        raise RuntimeError(f"{run_dir}: the last evaluation is not at step {steps}")
    return {"run_dir": str(run_dir), "val_bpb": val[-1]["bpb"], "heldout_bpb": heldout["bpb"],
            "heldout_tokens": heldout["tokens"],
            "curve": [{"step": r["step"], "bpb": r["bpb"]} for r in val],
            "qcontrol": [{k: r[k] for k in ("step", "lr_scale", "momentum", "action", "explored", "reward")}
                         for r in decisions]}


def run(tune_config: str, seeds: int, out: str, runs_dir: str, heldout_batches: int, command: str) -> dict:
    from pretrain.research.control_report import write_report

    spec = load_spec(tune_config)
    if spec.scheduler.name != "pbt":
        raise ValueError(f"{tune_config}: bench control needs a PBT tune config (scheduler.name: pbt)")
    out_dir, runs_root = Path(out), Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base = trial_config(spec, {}, "unset")
    steps, skip = base.train.steps, base.train.eval_batches
    tokens = steps * base.train.micro_batch_size * base.train.grad_accum * base.model.seq_length
    arms = {name: {"runs": []} for name in ARMS}
    pbt = []
    for seed in range(seeds):
        for arm in ("schedule", "qcontrol"):
            run_dir = single_run(spec, seed, arm, runs_root)
            arms[arm]["runs"].append(_run_record(run_dir, heldout_bpb(run_dir, skip, heldout_batches), steps))
        run_dir, summary = pbt_run(spec, seed, out_dir)
        record = _run_record(run_dir, heldout_bpb(run_dir, skip, heldout_batches), steps)
        record["best_trial"], record["best_config"] = summary["best"]["trial"], summary["best"]["config"]
        record["exploits"] = len(summary["exploits"])
        arms["pbt"]["runs"].append(record)
        pbt.append(summary)
    for arm in arms.values():
        for key in ("val_bpb", "heldout_bpb"):
            arm[key] = stats.summarize([r[key] for r in arm["runs"]])
    for name in ("qcontrol", "pbt"):
        arms[name]["welch_heldout"] = stats.welch(arms[name]["heldout_bpb"]["values"],
                                                  arms["schedule"]["heldout_bpb"]["values"])
    results = {"benchmark": "control", "command": command, "commit": provenance.commit(),
               "date": provenance.utc_now(), "hardware": provenance.hardware(),
               "dataset": provenance.dataset(base.data.path), "tune_config": tune_config,
               "model": base.model.name, "seeds": seeds, "steps": steps, "tokens_per_model": tokens,
               "pbt_population": spec.num_samples, "pbt_interval": spec.scheduler.perturbation_interval, "selection_batches": skip,
               "heldout_batches": heldout_batches, "lr": base.optim.lr, "min_lr": base.optim.min_lr,
               "warmup_steps": base.optim.warmup_steps, "qcontrol": dataclasses.asdict(base.optim.qcontrol),
               "search_space": [dataclasses.asdict(d) for d in spec.search_space], "arms": arms,
               "total_minutes": (time.time() - start) / 60}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out_dir)
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("control", help="LR control: warmup-cosine schedule vs the Q-learning controller "
                       "vs PBT, equal tokens per model, several seeds -> report.md",
                       description="Trains the base run of a PBT tune config three ways per seed: the "
                       "fixed schedule, the same with optim.qcontrol enabled, and a PBT search (best "
                       "model of the population). Scores every final model on validation batches past "
                       "those PBT selected on. Finished runs are reused; interrupted ones resume.")
    p.add_argument("--config", required=True, help="PBT tune YAML, e.g. configs/tune/control_tiny.yaml")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--out", required=True, help="report directory, e.g. reports/NAME")
    p.add_argument("--runs-dir", default="runs/control", help="where the single runs live (default runs/control)")
    p.add_argument("--heldout-batches", type=int, default=32,
                   help="validation batches scored after the selection batches (default 32)")
    return p


def main(args) -> int:
    results = run(args.config, args.seeds, args.out, args.runs_dir, args.heldout_batches, args.command)
    print(f"report: {Path(args.out) / 'report.md'} ({results['total_minutes']:.1f} min)")
    return 0
