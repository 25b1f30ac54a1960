"""Baseline vs variants at equal data and budget: train every (arm, seed), evaluate, test, report.

Every arm trains for the same token budget with the same per-seed data order (the loader's order
depends on ``train.seed`` only, so seed s gives every arm the same batches); seeds pair up
across arms. A run's directory is named by a hash of its resolved config: a finished run with
the same hash is reused, an unfinished one resumes from its checkpoint. Training runs in child
processes (`python -m pretrain train`), evaluation of retrieval tasks in this one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from model import get_family
from pretrain.bench import provenance
from pretrain.core.config import RunConfig, load_config, save_config
from pretrain.core.metrics import read_metrics
from pretrain.research import stats

ROOT = Path(__file__).resolve().parents[2]


def config_hash(cfg: RunConfig) -> str:
    """What determines a run's results: everything but where it writes, how it logs and the
    settings of other model families (so adding a family's keys keeps earlier runs reusable),
    plus the dataset's manifest digest (the same path re-prepared differently is other data)."""
    tree = cfg.to_dict()
    tree["train"].pop("run_dir")
    tree.pop("log")
    own = get_family(cfg.model.name).section
    for section in cfg.model.sections:
        if section != own:
            tree["model"].pop(section)
    tree["data"]["manifest_sha256"] = provenance.dataset_digest(cfg.data.path)
    return hashlib.sha256(yaml.safe_dump(tree, sort_keys=True).encode()).hexdigest()[:10]


def split_arm(arm: str) -> tuple[str, list[str]]:
    """``PATH`` or ``PATH:KEY=VALUE[,KEY=VALUE...]`` (an arm that is a config plus overrides,
    e.g. an ablation) -> (path, overrides)."""
    path, _, sets = arm.partition(":")
    return path, [s for s in sets.split(",") if s]


def arm_config(arm: str, overrides: list[str], seed: int, tokens: int, runs_dir: Path,
               evals: int = 4) -> tuple[RunConfig, Path]:
    path, arm_sets = split_arm(arm)
    cfg = load_config(path, [*overrides, *arm_sets, f"train.seed={seed}"])
    cfg.set_token_budget(tokens, evals)
    t = cfg.train
    t.checkpoint_every, t.keep_last = 0, 1
    cfg.log.wandb, cfg.log.progress = False, False
    name = f"{cfg.model.name}-seed{seed}-{config_hash(cfg)}"
    t.run_dir = str(runs_dir / name)
    return cfg, runs_dir / name


def finished(run_dir: Path, steps: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.is_file() and (run_dir / "checkpoints" / "latest").is_file()):
        return False
    return any(r.get("split") == "val" and r["step"] == steps for r in read_metrics(metrics))


def train_run(cfg: RunConfig, run_dir: Path) -> bool:
    """Train (or resume) in a child process; returns True if an existing finished run was reused."""
    if finished(run_dir, cfg.train.steps):
        return True
    config_path = run_dir.with_suffix(".yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_path)
    cmd = [sys.executable, "-m", "pretrain", "train", "--config", str(config_path), "--resume", "auto"]
    print(f"--- training {run_dir.name}: {cfg.train.steps} steps", flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"training {run_dir.name} failed with exit code {done.returncode}: "
                           f"{shlex.join(cmd)}")
    return False


def task_scores(run_dir: Path, contexts: list[int], seed: int = 0) -> dict:
    """Passkey and MQAR accuracy and bits per answer token per context length, cached in the run
    directory."""
    cache = run_dir / "tasks.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("contexts") == contexts and "answer_bits" in cached and "needle_mass" in cached:
            return cached
    import torch

    from data_pipeline.tasks import mqar_examples, passkey_examples, score
    from pretrain.tools.generate import Generator

    gen = Generator(str(run_dir))
    logits = lambda ids: gen.model(ids)  # noqa: E731  (labels None -> logits)
    usable = [c for c in contexts if c <= gen.cfg.model.seq_length]
    result = {"contexts": contexts, "passkey": {}, "mqar": {}, "answer_bits": {"passkey": {}, "mqar": {}}}
    with torch.no_grad():
        for c in usable:
            for task, examples in (("passkey", passkey_examples(gen.tokenizer, c, per_depth=2, seed=seed)),
                                   ("mqar", mqar_examples(gen.tokenizer, 4, c, num_examples=8, seed=seed))):
                scored = score(examples, logits)
                result[task][str(c)] = scored["accuracy"]
                result["answer_bits"][task][str(c)] = scored["answer_bits"]
    result["needle_mass"] = needle_masses(gen, usable, seed)
    cache.write_text(json.dumps(result, indent=2))
    return result


def needle_masses(gen, contexts: list[int], seed: int) -> dict:
    """The interpretability proxy per context length (pretrain/research/interpretability.py), on
    passkey prompts of min(context, its PROMPT_LIMIT) tokens; empty for a family whose core
    attentions do not capture q and k."""
    from data_pipeline.tasks import passkey_examples
    from pretrain.research.interpretability import PROMPT_LIMIT, needle_mass

    cores = getattr(gen.model, "core_attentions", lambda: [])()
    if not cores or not all(hasattr(core, "capture") for core in cores):
        return {}
    return {str(c): needle_mass(gen.model, passkey_examples(gen.tokenizer, min(c, PROMPT_LIMIT), per_depth=2,
                                                            seed=seed))["needle_mass"]
            for c in contexts}


def run_summary(cfg: RunConfig, run_dir: Path, reused: bool, contexts: list[int]) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    val = [r for r in records if r.get("split") == "val"]
    train = [r for r in records if "split" not in r]
    steady = train[1:] or train  # the first window includes warm-up
    tasks = task_scores(run_dir, contexts, seed=cfg.train.seed)
    last = train[-1]
    return {
        "seed": cfg.train.seed, "run_dir": str(run_dir), "reused": reused,
        "bpb": val[-1]["bpb"], "tokens": last["tokens"], "elapsed_s": last["elapsed_s"],
        "seconds_per_token": last["elapsed_s"] / last["tokens"],
        "tokens_per_s": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2],
        "mfu": sorted(r["mfu"] for r in steady)[len(steady) // 2],
        "peak_mem_mb": max(r["peak_mem_mb"] for r in train),
        "curve": [{"tokens": r["tokens"], "bpb": r["bpb"]} for r in val],
        "tasks": tasks,
        # a family's per-level training losses (FractalFormer), last log window
        "level_losses": {k: v for k, v in last.items() if k.startswith("loss_level")},
    }


def aggregate(name: str, config_path: str, cfg: RunConfig, runs: list[dict]) -> dict:
    from model import get_family

    family = get_family(cfg.model.name)
    saved = load_config(Path(runs[0]["run_dir"]) / "config.yaml")  # vocabulary resolved
    flops = family.training_flops_per_token(saved.model)
    arm = {"name": name, "config": config_path, "model": cfg.model.name, "data_path": cfg.data.path,
           "params": family.parameter_count(saved.model), "flops_per_token": flops,
           "training_flops": flops * runs[0]["tokens"], "runs": runs}
    for key in ("bpb", "seconds_per_token", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"):
        arm[key] = stats.summarize([r[key] for r in runs])
    arm["tasks"] = {}
    for task in ("passkey", "mqar"):
        contexts = sorted({int(c) for r in runs for c in r["tasks"][task]})
        by_context = {str(c): stats.summarize([r["tasks"][task][str(c)] for r in runs]) for c in contexts}
        overall = [sum(r["tasks"][task].values()) / max(len(r["tasks"][task]), 1) for r in runs]
        bits = {str(c): stats.summarize([r["tasks"]["answer_bits"][task][str(c)] for r in runs])
                for c in contexts}
        arm["tasks"][task] = {"accuracy": stats.summarize(overall), "by_context": by_context,
                              "bits_by_context": bits}
    needle = [r["tasks"].get("needle_mass") for r in runs]
    if all(needle):
        arm["needle_mass"] = {"mean_over_contexts": stats.summarize([sum(m.values()) / len(m) for m in needle]),
                              "by_context": {c: stats.summarize([m[c] for m in needle]) for c in needle[0]}}
    return arm


@dataclass
class CompareOptions:
    """What `bench compare` trains and measures (its command line, as one object)."""
    baseline: str                      # config YAML
    variants: list[str]                # config YAMLs, each optionally PATH:KEY=VALUE[,...]
    seeds: int = 2
    tokens: int = 1_000_000            # training tokens per run
    out: str = "reports/compare"
    overrides: list[str] = field(default_factory=list)   # applied to every arm
    runs_dir: str = "runs/compare"
    contexts: list[int] = field(default_factory=lambda: [128, 256])   # retrieval task lengths
    attention_max_n: int = 16384
    attention_fit: tuple[int, int] = (4096, 16384)
    attention_dir: str | None = None   # where the attention scaling lives (default OUT/attention)
    attention_sweeps: int = 1          # fresh processes per N: >= 2 gives the exponent a confidence interval


def run(options: CompareOptions, command: str) -> dict:
    from pretrain.research.compare_report import write_report

    o = options
    baseline, variants, seeds, tokens, overrides = o.baseline, o.variants, o.seeds, o.tokens, o.overrides
    contexts, attention_max_n, attention_fit = o.contexts, o.attention_max_n, o.attention_fit
    out_dir, runs_root = Path(o.out), Path(o.runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    arms, names = {}, []
    for path in [baseline, *variants]:
        runs, cfg = [], None
        for seed in range(seeds):
            cfg, run_dir = arm_config(path, overrides, seed, tokens, runs_root)
            reused = train_run(cfg, run_dir)
            runs.append(run_summary(cfg, run_dir, reused, contexts))
        stem, arm_sets = split_arm(path)
        name = cfg.model.name if cfg.model.name not in arms and not arm_sets else Path(stem).stem
        if arm_sets:
            name += f" [{', '.join(arm_sets)}]"
        arms[name] = aggregate(name, path, cfg, runs)
        names.append(name)
    base = names[0]
    for name in names[1:]:
        arms[name]["welch_bpb"] = stats.welch(arms[name]["bpb"]["values"], arms[base]["bpb"]["values"])
    # The attention scaling and the claims are those of the FIM design document: only with a FIM arm.
    claims_arm = next((n for n in names[1:] if arms[n]["model"] == "fim_mistral"), None)
    scaling = None
    attention_dir = Path(o.attention_dir) if o.attention_dir else out_dir / "attention"
    if claims_arm is not None:
        scaling = attention_scaling(attention_dir, min(1024, attention_fit[0]), attention_max_n, attention_fit,
                                    o.attention_sweeps)
    results = {"benchmark": "compare", "command": command, "commit": provenance.commit(),
               "date": provenance.utc_now(), "hardware": provenance.hardware(),
               "datasets": {name: provenance.dataset(arm["data_path"]) for name, arm in arms.items()},
               "baseline": base, "variants": names[1:], "claims_arm": claims_arm, "seeds": seeds,
               "tokens": tokens, "contexts": contexts, "arms": arms, "attention": scaling,
               "attention_path": os.path.relpath(attention_dir, out_dir)}
    results["claims"] = stats.claim_verdicts(results) if claims_arm is not None else []
    inspect_png = None
    if claims_arm is not None:
        inspect_png = out_dir / "fim_attention.png"
        _inspect(arms[claims_arm]["runs"][0]["run_dir"], inspect_png)
    results["inspect_attention_png"] = inspect_png.name if inspect_png else None
    results["total_minutes"] = (time.time() - start) / 60
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out_dir)
    return results


def attention_scaling(out_dir: Path, min_n: int, max_n: int, fit_range: tuple[int, int],
                      sweeps: int = 1) -> dict:
    """``bench attention`` at the FIM design's long-context geometry (B=64, b=4, top-2, 8 heads /
    2 KV, d=64), or its last result in ``out_dir`` when that timed the same code (kernels/,
    the attention dispatch and the benchmark itself; torch) with the same settings on this
    machine: a comparison rerun to add seeds or arms does not re-time attention (minutes at the
    default 16k). Delete ``out_dir`` to measure again."""
    import kernels
    from model import attention as model_attention
    from pretrain.bench import attention

    shape = attention.Shape()
    code = hashlib.sha256(kernels.SOURCE_TAG.encode())
    for module in (model_attention, attention):
        code.update(Path(module.__file__).read_bytes())
    hw = provenance.hardware()
    key = {"shape": asdict(shape), "min_n": min_n, "max_n": max_n, "fit_range": list(fit_range), "sweeps": sweeps,
           "code": code.hexdigest()[:16], **{k: hw[k] for k in ("processor", "cpus", "torch", "threads", "gpu")}}
    try:
        previous = json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        previous = None
    if previous is not None and previous.get("reuse_key") == key:
        print(f"--- attention scaling: reused {out_dir / 'results.json'} (same code, settings and machine)",
              flush=True)
        return previous
    print("--- attention scaling", flush=True)
    return attention.run(str(out_dir), min_n=min_n, max_n=max_n, shape=shape, fit_range=tuple(fit_range),
                         sweeps=sweeps, record={"reuse_key": key})


def _inspect(run_dir: str, png: Path) -> None:
    from types import SimpleNamespace

    from pretrain.tools.inspect_attention import main as inspect_main

    text = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet "
            "is the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale "
            "with grief that thou her maid art far more fair than she.")
    inspect_main(SimpleNamespace(ckpt=run_dir, text=text, out=str(png), layer=None))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="baseline vs variants at equal data and budget -> report.md",
                       description="Trains the baseline and every variant config for --tokens "
                                   "tokens with seeds 0..S-1 (same data order per seed; finished "
                                   "runs with the same resolved config are reused), evaluates "
                                   "validation bpb, throughput, memory, passkey and MQAR "
                                   "accuracy, runs the attention scaling benchmark, tests each "
                                   "variant against the baseline (Welch) and the FIM design "
                                   "claims, and writes OUT/report.md, OUT/results.json and plots.")
    p.add_argument("--baseline", required=True, help="baseline config YAML")
    p.add_argument("--variant", action="append", required=True,
                   help="variant config YAML (repeatable); PATH:KEY=VALUE[,KEY=VALUE] adds overrides to "
                   "this arm only (an ablation)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run (default 1M)")
    p.add_argument("--out", required=True, help="report directory, e.g. reports/NAME")
    p.add_argument("--runs-dir", default="runs/compare", help="where runs live (default runs/compare)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every arm (repeatable)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256],
                   help="context lengths of the retrieval tasks (default 128 256)")
    p.add_argument("--attention-max-n", type=int, default=16384,
                   help="largest N of the attention scaling benchmark (default 16384)")
    p.add_argument("--attention-fit", type=int, nargs=2, default=[4096, 16384], metavar=("LO", "HI"),
                   help="N range of the exponent fit (default 4096 16384)")
    p.add_argument("--attention-sweeps", type=int, default=1,
                   help="times each N is measured in a fresh process; >= 2 gives the fitted exponent a "
                   "95%% confidence interval that the O(N log N) verdict uses (default 1)")
    return p


def main(args) -> int:
    options = CompareOptions(args.baseline, args.variant, args.seeds, args.tokens, args.out, args.overrides,
                             args.runs_dir, args.contexts, args.attention_max_n, tuple(args.attention_fit),
                             attention_sweeps=args.attention_sweeps)
    results = run(options, args.command)
    print(f"report: {Path(args.out) / 'report.md'} ({results['total_minutes']:.1f} min)")
    return 0
