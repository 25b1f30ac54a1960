"""`make demo`: prepare the Shakespeare shards (once), train the tiny baseline from scratch,
print validation bits per byte at the start and the end, and where the run directory is."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from data_pipeline.prepare import prepare
from data_pipeline.verify import verify

from .config import load_config
from .metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def ensure_dataset(data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file() and not verify(data_dir):
        print(f"data: reusing {data_dir} (every shard matches its manifest)")
        return
    print(f"data: preparing Shakespeare byte shards in {data_dir}")
    prepare("shakespeare", data_dir, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "mistral_tiny.yaml"))
    parser.add_argument("--run-dir", default="runs/demo", help="replaced on every demo run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, [*args.overrides, f"train.run_dir={args.run_dir}"])
    ensure_dataset(Path(cfg.data.path))
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    from .trainer import train

    start = time.time()
    code = train(cfg, resume="never")
    minutes = (time.time() - start) / 60
    if code != 0:
        return code
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "val"]
    print("\n=== demo summary ===")
    print(f"model           {cfg.model.name} (configs/{Path(args.config).name}), {cfg.train.steps} steps")
    print(f"val bpb start   {evals[0]['bpb']:.3f}  (step {evals[0]['step']}; uniform bytes = 8.0)")
    print(f"val bpb end     {evals[-1]['bpb']:.3f}  (step {evals[-1]['step']})")
    print(f"training time   {minutes:.1f} min")
    print(f"run directory   {run_dir.resolve()}  (metrics.jsonl, checkpoints/, config.yaml, wandb/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
