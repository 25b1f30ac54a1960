"""Turn a source into tokenized train/val webdataset shards plus a manifest."""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

from .shards import MANIFEST_VERSION, ShardSetWriter, write_manifest
from .sources import Document, load_source
from .tokenizer import ByteTokenizer


def split_by_group(docs: list[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    """Deterministic split: groups ordered by a seeded hash; the first ceil(f * n) go to val."""
    groups = sorted({d.group for d in docs},
                    key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n_val = math.ceil(val_fraction * len(groups)) if val_fraction > 0 else 0
    if len(groups) > 1:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(groups) - 1)
    val_groups = set(groups[:n_val])
    return {"train": [d for d in docs if d.group not in val_groups],
            "val": [d for d in docs if d.group in val_groups]}


def prepare(source: str, out: str | Path, *, val_fraction: float = 0.1, shard_mb: float = 1.0,
            seed: int = 0, overwrite: bool = False, log=print) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    docs = load_source(source)
    unique, seen = [], set()
    for d in docs:  # exact duplicates would leak across the split and skew epochs
        digest = hashlib.sha256(d.data).digest()
        if digest not in seen:
            seen.add(digest)
            unique.append(d)
    tokenizer = ByteTokenizer()
    splits = split_by_group(unique, val_fraction, seed)
    # Write into a temporary directory first: a crash never leaves a half-written dataset
    # that looks complete.
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest = {"version": MANIFEST_VERSION, "source": source, "seed": seed,
                "val_fraction": val_fraction, "tokenizer": tokenizer.describe(),
                "duplicates_removed": len(docs) - len(unique), "splits": {}}
    for split, split_docs in splits.items():
        writer = ShardSetWriter(tmp, split, int(shard_mb * 2**20), tokenizer.token_dtype)
        for i, doc in enumerate(split_docs):
            writer.write(f"{i:08d}", doc.name, tokenizer.encode(doc.data), len(doc.data))
        shards = writer.finish()
        manifest["splits"][split] = {
            "documents": len(split_docs), "names": [d.name for d in split_docs],
            "tokens": sum(s["tokens"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
            "shards": shards}
        log(f"{split}: {len(split_docs)} documents, {manifest['splits'][split]['bytes']:,} bytes, "
            f"{len(shards)} shards")
    write_manifest(tmp, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return manifest
