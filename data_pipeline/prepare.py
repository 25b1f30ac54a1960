"""Turn sources into tokenized train/val webdataset shards plus a manifest.

Steps: load every source; drop exact duplicate documents; split train/val by document group
(seeded, deterministic); weight sources in the train split (weight w: each document appears
floor(w) times, plus once more for a seeded fraction w - floor(w) of them); shuffle the train
documents so that shards mix sources; tokenize (raw bytes, or a sentencepiece model trained here
on the train split); write shards of about --shard-mb each and manifest.json.
"""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np

from .shards import MANIFEST_VERSION, ShardSetWriter, write_manifest
from .sources import Document, load_source, parse_weighted
from .tokenizer import ByteTokenizer, SentencePieceTokenizer


def _seeded_hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_by_group(docs: list[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    """Deterministic split: groups ordered by a seeded hash; the first ceil(f * n) go to val."""
    groups = sorted({d.group for d in docs}, key=lambda g: _seeded_hash(seed, g))
    n_val = math.ceil(val_fraction * len(groups)) if val_fraction > 0 else 0
    if len(groups) > 1:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(groups) - 1)
    val_groups = set(groups[:n_val])
    return {"train": [d for d in docs if d.group not in val_groups],
            "val": [d for d in docs if d.group in val_groups]}


def apply_weight(docs: list[Document], weight: float, seed: int) -> list[Document]:
    whole, frac = int(weight), weight - int(weight)
    extra = [d for d in docs if int(_seeded_hash(seed, "w:" + d.name)[:8], 16) / 2**32 < frac]
    return docs * whole + extra


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def prepare(sources: str | list[str], out: str | Path, *, tokenizer: str = "bytes",
            vocab_size: int = 4096, sp_model_type: str = "bpe", val_fraction: float = 0.1,
            shard_mb: float = 1.0, seed: int = 0, overwrite: bool = False, log=print) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
    specs = [parse_weighted(s) for s in ([sources] if isinstance(sources, str) else sources)]
    stats = {"duplicates_removed": 0, "dropped_not_utf8": 0, "dropped_not_lossless": 0}
    seen: set[bytes] = set()
    split_docs: dict[str, list[Document]] = {"train": [], "val": []}
    for source, weight in specs:
        unique = []
        for d in load_source(source):  # exact duplicates would leak across the split
            digest = hashlib.sha256(d.data).digest()
            if digest in seen:
                stats["duplicates_removed"] += 1
                continue
            seen.add(digest)
            unique.append(Document(d.name, f"{source}:{d.group}", d.data))
        if tokenizer == "sentencepiece":
            kept = [d for d in unique if _is_utf8(d.data)]
            stats["dropped_not_utf8"] += len(unique) - len(kept)
            unique = kept
        parts = split_by_group(unique, val_fraction, seed)
        split_docs["train"] += apply_weight(parts["train"], weight, seed)
        split_docs["val"] += parts["val"]
    order = np.random.default_rng(seed).permutation(len(split_docs["train"]))
    split_docs["train"] = [split_docs["train"][i] for i in order]

    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer == "sentencepiece":
        log(f"training sentencepiece {sp_model_type} ({vocab_size} pieces) on the train split")
        tok = SentencePieceTokenizer.train((d.data for d in split_docs["train"]), vocab_size,
                                           sp_model_type)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r} (allowed: bytes, sentencepiece)")

    # Write into a temporary directory first: a crash never leaves a half-written dataset
    # that looks complete.
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if isinstance(tok, SentencePieceTokenizer):
        tok.save(tmp)
    manifest = {"version": MANIFEST_VERSION, "sources": [{"source": s, "weight": w} for s, w in specs],
                "seed": seed, "val_fraction": val_fraction, "tokenizer": tok.describe(), "splits": {}}
    for split, docs in split_docs.items():
        writer = ShardSetWriter(tmp, split, int(shard_mb * 2**20), tok.token_dtype, tok.fingerprint)
        names = []
        for doc in docs:
            ids = tok.encode(doc.data)
            if isinstance(tok, SentencePieceTokenizer) and tok.decode(ids) != doc.data:
                stats["dropped_not_lossless"] += 1  # e.g. text holding U+2581
                continue
            writer.write(f"{len(names):08d}", doc.name, ids, len(doc.data))
            names.append(doc.name)
        shards = writer.finish()
        manifest["splits"][split] = {
            "documents": len(names), "names": names,
            "tokens": sum(s["tokens"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
            "shards": shards}
        log(f"{split}: {len(names)} documents, {manifest['splits'][split]['bytes']:,} bytes, "
            f"{manifest['splits'][split]['tokens']:,} tokens, {len(shards)} shards")
    manifest.update(stats)
    write_manifest(tmp, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest
