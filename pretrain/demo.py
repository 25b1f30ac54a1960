"""`make demo`: prepare the Shakespeare shards (once), then a baseline-vs-FIM report on the tiny
configs: both arms trained from scratch for the same token budget with 2 seeds each, evaluated,
tested and written to reports/demo/report.md. Finished runs are reused, so a second `make demo`
only re-evaluates and re-renders."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from data_pipeline.prepare import prepare
from data_pipeline.verify import verify

from .config import load_config

ROOT = Path(__file__).resolve().parents[1]


def ensure_dataset(data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file() and not verify(data_dir):
        print(f"data: reusing {data_dir} (every shard matches its manifest)")
        return
    print(f"data: preparing Shakespeare byte shards in {data_dir}")
    prepare("shakespeare", data_dir, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__)
    parser.add_argument("--baseline", default="configs/mistral_tiny.yaml")
    parser.add_argument("--variant", default="configs/fim_mistral_tiny.yaml")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    parser.add_argument("--out", default="reports/demo")
    parser.add_argument("--runs-dir", default="runs/demo")
    args = parser.parse_args(argv)

    ensure_dataset(Path(load_config(ROOT / args.baseline).data.path))
    from .bench import compare

    cli = ["python", "-m", "pretrain", "bench", "compare", "--baseline", args.baseline,
           "--variant", args.variant, "--seeds", str(args.seeds), "--tokens", str(args.tokens),
           "--out", args.out, "--runs-dir", args.runs_dir]
    results = compare.run(args.baseline, [args.variant], args.seeds, args.tokens, args.out, [],
                          args.runs_dir, [128, 256], 16384, (4096, 16384), shlex.join(cli))
    print("\n=== demo summary ===")
    for name, arm in results["arms"].items():
        runs = arm["runs"]
        start = sum(r["curve"][0]["bpb"] for r in runs) / len(runs)
        print(f"{name:<12} val bpb {start:.3f} at step 0 -> {arm['bpb']['mean']:.3f} ± "
              f"{arm['bpb']['std']:.3f} after {runs[0]['tokens']:,} tokens ({len(runs)} seeds, "
              f"{arm['tokens_per_s']['mean']:,.0f} tokens/s)")
    for claim in results["claims"]:
        print(f"claim: {claim['claim']:<36} {claim['verdict']}")
    print(f"report          {(Path(args.out) / 'report.md').resolve()}  ({results['total_minutes']:.1f} min)")
    print(f"runs            {Path(args.runs_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
