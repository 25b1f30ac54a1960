"""The work of ``prepare``, one item at a time: scan a unit, deduplicate a hash partition, write
a unit's shards. Each item depends only on its own inputs and the plan, never on which process,
worker or node runs it, so any split of the items gives the same files; each ends by writing a
done marker atomically, so a re-run skips it.

Memory per item: one tokenization batch (~4 MiB of text), one Parquet row group, one run of
content hashes (``HASH_RUN`` entries, 20 B each), the sentencepiece sample (``--sp-sample-mb``,
only when training one) and, in dedup, 28 B per document of one partition.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
from array import array
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .readers import Bad, InputError, read_documents
from .shards import ShardSetWriter
from .sources import InputFile, split_key

HASH_DTYPE = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("doc", "<u4")])
HASH_RUN = 1 << 20
BATCH_BYTES = 4 << 20  # text per tokenizer call: bigger batches amortize its per-call cost


def seeded_fraction(seed: int, text: str) -> float:
    """A deterministic number in [0, 1) for (seed, text)."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 2**32


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def item_file(work: Path, phase: str, i: int, suffix: str = ".json") -> Path:
    """A work item's file: unit i of scan/write (``u000012``), hash partition i of dedup (``p00012``)."""
    return work / phase / (f"p{i:05d}{suffix}" if phase == "dedup" else f"u{i:06d}{suffix}")


class Context:
    """What every item needs: the plan, its options and where the work lives."""

    def __init__(self, root: Path, plan: dict, storage_options: dict | None = None):
        self.root, self.plan, self.opts = root, plan, plan["options"]
        self.work = root / "_work"
        self.storage_options = storage_options or {}
        self.progress = lambda n: None        # input bytes read
        self.count_documents = lambda n: None  # documents read
        self._tokenizer = None

    def files(self, unit: dict) -> list[tuple[InputFile, bool | None]]:
        return [(InputFile(*f[:5]), f[5]) for f in unit["files"]]

    def documents(self, unit: dict, errors: dict | None = None):
        """The unit's valid documents in order, as (ordinal, name, is_val, bytes); bad input
        counted into ``errors[path][kind]`` (or raised with --on-error fail)."""
        opts, ordinal = self.opts, 0
        needs_utf8 = opts["tokenizer"] != "bytes"
        source = self.plan["sources"][unit["source"]]["source"]
        for f, file_val in self.files(unit):
            for item in read_documents(f, text_field=opts["text_field"], group_field=opts["group_field"],
                                       storage_options=self.storage_options, progress=self.progress):
                if not isinstance(item, Bad) and needs_utf8 and f.fmt == "text":  # JSON / Parquet text is Unicode
                    try:
                        item[2].decode("utf-8")
                    except UnicodeDecodeError:
                        item = Bad("not_utf8", f"{f.path}" if f.fmt == "text" else item[0])
                if isinstance(item, Bad):
                    if opts["on_error"] == "fail":
                        raise InputError(f"{item.kind.replace('_', ' ')}: {item.where} "
                                         "(--on-error skip counts bad input and goes on)")
                    if errors is not None:
                        errors.setdefault(f.path, Counter())[item.kind] += 1
                    continue
                name, group, data = item
                if file_val is None:  # split by the document's own group field
                    is_val = seeded_fraction(opts["seed"], split_key(source, group)) < opts["val_fraction"]
                else:
                    is_val = file_val
                yield ordinal, name, is_val, data
                ordinal += 1
                if not ordinal % 64:
                    self.count_documents(64)
        self.count_documents(ordinal % 64)

    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import ByteTokenizer, load_tokenizer_file

            kind = self.opts["tokenizer"]
            if kind == "bytes":
                self._tokenizer = ByteTokenizer()
            elif kind == "sentencepiece":
                from .tokenizer import SentencePieceTokenizer
                self._tokenizer = SentencePieceTokenizer((self.root / "tokenizer.model").read_bytes())
            else:
                self._tokenizer = load_tokenizer_file(kind, self.opts["eos_token"])
        return self._tokenizer


def scan_unit(ctx: Context, unit: dict) -> dict:
    """Content hashes (runs sorted by partition) and, when sentencepiece is trained here, the
    unit's share of the seeded sample: train documents with the smallest seeded keys."""
    u, parts = unit["index"], ctx.opts["dedup_partitions"]
    errors: dict = {}
    hash_path = item_file(ctx.work, "scan", u, ".hash")
    runs = []
    digests, ordinals = bytearray(), array("I")  # 16 + 4 bytes per document of the current run
    sample_budget = int(ctx.opts["sp_sample_mb"] * 2**20) if ctx.opts["tokenizer"] == "sentencepiece" else 0
    heap, heap_bytes = [], 0  # max-heap of (-key, size, data)
    seed_prefix = f"{ctx.opts['seed']}:sample:".encode()
    count = 0
    with open(hash_path, "wb") as out:
        def flush():
            if not ordinals:
                return
            halves = np.frombuffer(bytes(digests), dtype="<u8").reshape(-1, 2)
            arr = np.empty(len(ordinals), HASH_DTYPE)
            arr["h0"], arr["h1"], arr["doc"] = halves[:, 0], halves[:, 1], np.frombuffer(ordinals, dtype=np.uint32)
            arr = arr[np.argsort(arr["h0"] % parts, kind="stable")]
            bounds = np.searchsorted(arr["h0"] % parts, np.arange(parts + 1))
            start = out.tell() // HASH_DTYPE.itemsize
            runs.append((bounds + start).tolist())
            out.write(arr.tobytes())
            del digests[:], ordinals[:]
        for ordinal, _, is_val, data in ctx.documents(unit, errors):
            digest = hashlib.sha256(data).digest()
            digests += digest[:16]
            ordinals.append(ordinal)
            count += 1
            if len(ordinals) >= HASH_RUN:
                flush()
            if sample_budget and not is_val:
                key = int.from_bytes(hashlib.sha256(seed_prefix + digest).digest()[:8], "little")
                heapq.heappush(heap, (-key, len(data), data))
                heap_bytes += len(data)
                while heap_bytes > sample_budget and len(heap) > 1:
                    heap_bytes -= heapq.heappop(heap)[1]
        flush()
    marker = {"documents": count, "runs": runs,
              "errors": {p: dict(c) for p, c in errors.items()}}
    if sample_budget:
        chosen = sorted((-k, s, d) for k, s, d in heap)
        with open(item_file(ctx.work, "scan", u, ".sample"), "wb") as out:
            for _, _, data in chosen:
                out.write(data)
        marker["sample"] = [[k, s] for k, s, _ in chosen]
    write_json(item_file(ctx.work, "scan", u, ".json"), marker)
    return marker


def dedup_partition(ctx: Context, p: int) -> dict:
    """Exact duplicates within one hash partition: the first occurrence (in unit, then document
    order) is kept; the others are listed as unit << 32 | document, sorted."""
    h0, h1, keys = [], [], []
    for unit in ctx.plan["units"]:
        u = unit["index"]
        marker = json.loads(item_file(ctx.work, "scan", u, ".json").read_text())
        if not marker["runs"]:
            continue
        arr = np.memmap(item_file(ctx.work, "scan", u, ".hash"), dtype=HASH_DTYPE, mode="r")
        for bounds in marker["runs"]:
            seg = arr[bounds[p]:bounds[p + 1]]
            h0.append(np.array(seg["h0"]))
            h1.append(np.array(seg["h1"]))
            keys.append((np.uint64(u) << np.uint64(32)) | seg["doc"].astype(np.uint64))
    if keys:
        h0, h1, keys = np.concatenate(h0), np.concatenate(h1), np.concatenate(keys)
        order = np.lexsort((keys, h1, h0))
        h0, h1, keys = h0[order], h1[order], keys[order]
        dup = (h0[1:] == h0[:-1]) & (h1[1:] == h1[:-1])
        drops = np.sort(keys[1:][dup])
    else:
        drops = np.zeros(0, np.uint64)
    np.save(item_file(ctx.work, "dedup", p, ".npy"), drops)
    marker = {"duplicates": int(drops.size)}
    write_json(item_file(ctx.work, "dedup", p, ".json"), marker)
    return marker


def _drops(ctx: Context, u: int) -> set[int]:
    lo, hi = np.uint64(u) << np.uint64(32), np.uint64(u + 1) << np.uint64(32)
    found: set[int] = set()
    for p in range(ctx.opts["dedup_partitions"]):
        arr = np.load(item_file(ctx.work, "dedup", p, ".npy"), mmap_mode="r")
        a, b = np.searchsorted(arr, [lo, hi])
        found.update(int(k) & 0xFFFFFFFF for k in arr[a:b])
    return found


def write_unit(ctx: Context, unit: dict) -> dict:
    """Tokenize the unit's kept documents into its own train/val shards (a weighted source's
    repeats go to shards of their own), checking every document's round trip and byte count."""
    u, opts = unit["index"], ctx.opts
    for stale in ctx.root.glob(f"*-{u:06d}*.tar"):  # a killed earlier attempt
        stale.unlink()
    tok = ctx.tokenizer()
    check_round_trip = not tok.lossless_by_construction
    weight = ctx.plan["sources"][unit["source"]]["weight"]
    whole, frac = int(weight), weight - int(weight)
    drops = _drops(ctx, u)
    target = int(opts["shard_mb"] * 2**20)
    writers: dict[tuple[str, int], ShardSetWriter] = {}
    counts = Counter()
    batch: list[tuple[str, bool, int, bytes]] = []

    def writer(split: str, r: int) -> ShardSetWriter:
        if (split, r) not in writers:
            prefix = f"{split}-{u:06d}" + (f"r{r}" if r else "")
            writers[(split, r)] = ShardSetWriter(ctx.root, prefix, target, tok.token_dtype, tok.fingerprint)
        return writers[(split, r)]

    def flush():
        ids = tok.encode_many([d for *_, d in batch])
        back = tok.decode_many(ids) if check_round_trip else None
        for j, ((name, is_val, copies, data), tokens) in enumerate(zip(batch, ids)):
            exact = tok.kind == "bytes" or (
                int(tok.bytes_per_token[tokens.astype(np.int64)].sum()) - tok.prefix_bytes == len(data)
                and (back is None or back[j] == data))
            if not exact:
                counts["dropped_not_lossless"] += 1  # e.g. text holding U+2581, or a special token's text
                continue
            split = "val" if is_val else "train"
            for r in range(copies):
                w = writer(split, r)
                w.write(f"{u:06d}{r:02d}{w.documents:09d}", name, tokens, len(data))
        batch.clear()

    seen, batch_bytes = 0, 0
    for ordinal, name, is_val, data in ctx.documents(unit):
        seen += 1
        if ordinal in drops:
            counts["duplicates_removed"] += 1
            continue
        copies = 1 if is_val else whole + (seeded_fraction(opts["seed"], "w:" + name) < frac)
        if copies == 0:
            continue
        batch.append((name, is_val, copies, data))
        batch_bytes += len(data)
        if batch_bytes >= BATCH_BYTES:
            flush()
            batch_bytes = 0
    if batch:
        flush()
    scanned = json.loads(item_file(ctx.work, "scan", u, ".json").read_text())["documents"]
    if seen != scanned:
        raise InputError(f"unit {u} ({unit['files'][0][0]} ...) held {scanned} documents when scanned and "
                         f"{seen} now: an input changed during prepare; re-run with --overwrite")
    marker = {"splits": defaultdict(list), **counts}
    for (split, _), w in sorted(writers.items()):
        marker["splits"][split] += w.finish()
    write_json(item_file(ctx.work, "write", u, ".json"), marker)
    return marker
