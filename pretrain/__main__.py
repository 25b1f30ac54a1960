"""`python -m pretrain <verb>`: the stack's command line, a table of verbs. Each verb's module owns
its parser (``add_parser(subparsers)``) and runs it (``main(args) -> exit status``); only the
chosen verb's module is imported to build its parser, so `--help` loads none of them."""
from __future__ import annotations

import argparse
import atexit
import importlib
import os
import shlex
import sys
import threading

# verb -> (module, one line for the verb list)
VERBS = {
    "train": ("pretrain.core.trainer", "train a model (DeepSpeed engine over megatron-core)"),
    "bench": (None, "benchmarks that write OUT/results.json (and reports)"),
    "export": ("pretrain.tools.export", "consolidate a checkpoint into one safetensors file (or HF)"),
    "generate": ("pretrain.tools.generate", "sample text from a checkpoint, streamed"),
    "continual": ("pretrain.research.continual", "online learning on a text stream with a hash-indexed memory"),
    "inspect-attention": ("pretrain.tools.inspect_attention", "PNG of a FIM checkpoint's attention on a text"),
    "tune": ("pretrain.research.tune", "Ray Tune search over the trainer (PBT, PB2, ASHA)"),
    "compress": ("pretrain.tools.compress", "magnitude pruning + fine-tuning, int8 check"),
    "check-kernels": ("pretrain.bench.kernel_check", "compile every Triton kernel for NVIDIA GPUs (no GPU needed)"),
    "demo": ("pretrain.research.demo", "`make demo`: Shakespeare shards, then baseline vs FIM -> reports/demo"),
}
BENCHMARKS = {   # `bench <what>`
    "data": ("pretrain.bench.data", "packed-sequence throughput of the loader, 1 and 2 workers"),
    "attention": ("pretrain.bench.attention", "fwd+bwd time and memory vs sequence length"),
    "kernels": ("pretrain.bench.kernels", "fused kernels vs torch eager and torch.compile"),
    "train": ("pretrain.bench.train", "training tokens/s of our trainer vs transformers' Mistral"),
    "control": ("pretrain.research.control", "LR control: schedule vs Q-learning controller vs PBT"),
    "generate": ("pretrain.bench.generate", "CPU generation tokens/s and peak RSS, float vs int8"),
    "prepare": ("pretrain.bench.prepare", "data_pipeline prepare vs datatrove: MB/s at 1 and 2 workers, peak RSS"),
    "compare": ("pretrain.research.compare", "baseline vs variants at equal data and budget -> report.md"),
    "recall": ("pretrain.research.recall", "MQAR (Zoology): dense vs window vs FIM attention trained on the task"),
    "long-context": ("pretrain.research.long_context", "baseline vs FIM trained at several context lengths -> one report"),
}


def _add_verbs(sub, table: dict, chosen: str | None) -> None:
    """The chosen verb's real parser; the others as one-line entries of the verb list."""
    for verb, (module, help_line) in table.items():
        if verb != chosen or module is None:
            sub.add_parser(verb, help=help_line, add_help=False)
            continue
        verb_module = importlib.import_module(module)
        parser = verb_module.add_parser(sub)
        parser.set_defaults(run=verb_module.main, parser=parser)


def _first_word(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m pretrain",
                                     description="Distributed pretraining for fractal architectures.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verb = _first_word(argv)
    _add_verbs(sub, VERBS, verb)
    if verb == "bench":
        bench = sub.choices["bench"]
        bench.description = "Measure, print a table and write OUT/results.json."
        bench.add_argument("-h", "--help", action="help", help="show this help message and exit")
        what = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
        _add_verbs(what, BENCHMARKS, _first_word(argv[argv.index("bench") + 1:]))
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "pretrain", *argv])   # what reports record

    from data_pipeline.reshard import ReshardError
    from data_pipeline.shards import ShardError
    from data_pipeline.storage import StoreError
    from model.config import ConfigError
    from pretrain.core.checkpoint import CheckpointError
    from pretrain.core.trainer import EXIT_DIVERGED, TrainingDiverged

    if args.verb == "bench":
        from pretrain.bench.provenance import busy_warning
        warning = busy_warning()
        if warning:
            print(warning, file=sys.stderr, flush=True)
    try:
        return args.run(args)
    except (ConfigError, ShardError, StoreError, CheckpointError, ReshardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED


def exit_without_teardown(rc: int) -> None:
    """Leave without the interpreter's teardown. With torch, megatron, DeepSpeed and Triton loaded,
    finalizing the modules runs full garbage collections over millions of objects: 1.5 s after
    every command on a 2-core machine, more than a tiny run's training. What matters in a normal
    exit still happens first: the atexit handlers (multiprocessing children, logging, wandb,
    temporary directories) and flushed standard streams; files we write are closed or
    line-buffered, process groups destroyed by the trainer. While another non-daemon thread runs,
    this is a normal exit (Python would wait for it). ``PRETRAIN_FULL_EXIT=1`` always is."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if os.environ.get("PRETRAIN_FULL_EXIT") == "1" or any(t.is_alive() for t in others):
        sys.exit(rc)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    exit_without_teardown(main())
