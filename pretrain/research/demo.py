"""`make demo`: prepare the Shakespeare shards (once), then a baseline-vs-FIM report on the demo
configs: both arms trained from scratch for the same token budget (by default the baseline
config's own steps) with 2 seeds each, evaluated, tested and written to reports/demo/report.md.
Finished runs are reused, so a second `make demo` only re-evaluates and re-renders."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from data_pipeline.prepare import prepare
from data_pipeline.verify import verify
from pretrain.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def ensure_dataset(data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file() and not verify(data_dir):
        print(f"data: reusing {data_dir} (every shard matches its manifest)")
        return
    print(f"data: preparing Shakespeare byte shards in {data_dir}")
    prepare("shakespeare", data_dir, overwrite=True)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="`make demo`: Shakespeare shards, then baseline vs FIM -> reports/demo",
                       description=__doc__)
    p.add_argument("--baseline", default="configs/mistral_demo.yaml", help="default configs/mistral_demo.yaml")
    p.add_argument("--variant", default="configs/fim_mistral_demo.yaml", help="default configs/fim_mistral_demo.yaml")
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    p.add_argument("--tokens", type=int, default=None,
                   help="training tokens per run (default: the baseline config's steps x batch x context)")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="context lengths of the retrieval tasks (default: the baseline's context)")
    p.add_argument("--attention-sweeps", type=int, default=2,
                   help="fresh-process timings per N of the attention scaling (default 2: the exponent "
                   "gets a confidence interval)")
    p.add_argument("--out", default="reports/demo", help="report directory (default reports/demo)")
    p.add_argument("--runs-dir", default="runs/demo", help="where runs live (default runs/demo)")
    return p


def main(args) -> int:
    base = load_config(ROOT / args.baseline)
    ensure_dataset(Path(base.data.path))
    from pretrain.research import compare

    t = base.train
    tokens = args.tokens or t.steps * t.micro_batch_size * t.grad_accum * base.model.seq_length
    contexts = args.contexts or [base.model.seq_length]
    # the report records the equivalent `bench compare` command: what reproduces its numbers
    cli = ["python", "-m", "pretrain", "bench", "compare", "--baseline", args.baseline,
           "--variant", args.variant, "--seeds", str(args.seeds), "--tokens", str(tokens),
           "--contexts", *map(str, contexts), "--attention-sweeps", str(args.attention_sweeps),
           "--out", args.out, "--runs-dir", args.runs_dir]
    options = compare.CompareOptions(args.baseline, [args.variant], args.seeds, tokens, args.out,
                                     runs_dir=args.runs_dir, contexts=contexts,
                                     attention_sweeps=args.attention_sweeps)
    results = compare.run(options, shlex.join(cli))
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
