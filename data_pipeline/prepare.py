"""Turn sources into tokenized train/val webdataset shards plus a manifest, as a stream.

Phases (``--phase all`` runs them in order; a multi-node job runs each on every node):
  plan      list the input files (names and sizes only), rank file groups for the split, cut the
            file list into *units* of about ``--unit-mb`` (small files grouped, a big file alone)
  scan      per unit: read every document, count bad input, hash its content (runs sorted by
            hash partition, on disk), draw its share of the sentencepiece training sample
  dedup     per hash partition: exact duplicates; the first occurrence in input order is kept
  tokenizer train sentencepiece on the seeded sample, or copy the given tokenizer file
  write     per unit: read again, drop duplicates, weight, tokenize, check each document's round
            trip and byte count, write the unit's own shards
  finalize  the manifest (shards and counts, no document names) and its digest; the dataset
            directory appears only now (``OUT.partial`` until then)

Every unit and partition depends only on the inputs and the options, so 1, N workers or K
nodes (``--task-index/--task-count``: item i belongs to task i mod K) give the same files and
the same manifest digest. Each item ends with a done marker: re-running the same command after a
kill redoes only unfinished items. Nothing is held per document across the run.

Split: train/val by a seeded hash of the document's group (its file, or ``--group-field``).
Weights: a source of weight w writes each train document floor(w) times, plus once more for a
seeded fraction w - floor(w) of them; repeats go to shards of their own. Shuffling is the
loader's job (a shard permutation per epoch and a shuffle buffer).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

from . import passes
from .passes import Context, item_file, write_json
from .shards import MANIFEST, MANIFEST_VERSION, write_manifest
from .sources import list_source, parse_weighted, split_key
from .tokenizer import SentencePieceTokenizer, load_tokenizer_file

PHASES = ("plan", "scan", "dedup", "tokenizer", "write", "finalize")
PLAN_FILE = "plan.json"


def _seeded_hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def val_groups(groups: list[str], val_fraction: float, seed: int) -> set[str]:
    """Deterministic split: groups ordered by a seeded hash; the first ceil(f * n) go to val
    (at least one and never all of them when there are two or more)."""
    groups = sorted(set(groups), key=lambda g: _seeded_hash(seed, g))
    n_val = math.ceil(val_fraction * len(groups)) if val_fraction > 0 else 0
    if len(groups) > 1:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(groups) - 1)
    return set(groups[:n_val])


def options(sources, *, tokenizer="bytes", vocab_size=4096, sp_model_type="bpe", sp_sample_mb=64.0,
            val_fraction=0.1, shard_mb=1.0, seed=0, text_field="text", group_field=None,
            unit_mb=64.0, dedup_partitions=64, on_error="skip", eos_token=None) -> dict:
    """Everything that decides the dataset (workers, tasks and credentials do not)."""
    specs = [parse_weighted(s) for s in ([sources] if isinstance(sources, str) else sources)]
    tok_sha = None
    if tokenizer not in ("bytes", "sentencepiece"):
        path = Path(tokenizer).resolve()
        load_tokenizer_file(path, eos_token)  # a clear error now, not in a worker later
        tokenizer, tok_sha = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error={on_error!r} (allowed: skip, fail)")
    return {"sources": [[s, w] for s, w in specs], "tokenizer": tokenizer, "tokenizer_sha256": tok_sha,
            "vocab_size": vocab_size, "sp_model_type": sp_model_type, "sp_sample_mb": sp_sample_mb,
            "val_fraction": val_fraction, "shard_mb": shard_mb, "seed": seed, "text_field": text_field,
            "group_field": group_field, "unit_mb": unit_mb, "dedup_partitions": dedup_partitions,
            "on_error": on_error, "eos_token": eos_token}


def make_plan(opts: dict, storage_options: dict | None = None) -> dict:
    units, sources = [], []
    for si, (spec, weight) in enumerate(opts["sources"]):
        files = list_source(spec, storage_options)
        per_doc = {f.path for f in files if opts["group_field"] and f.fmt != "text"}
        val = val_groups([split_key(spec, f.group) for f in files if f.path not in per_doc],
                         opts["val_fraction"], opts["seed"])
        sources.append({"source": spec, "weight": weight, "files": len(files),
                        "bytes": sum(f.size for f in files)})
        current, size = [], 0
        for f in files:
            is_val = None if f.path in per_doc else split_key(spec, f.group) in val
            current.append([f.path, f.name, f.group, f.size, f.fmt, is_val])
            size += f.size
            if size >= opts["unit_mb"] * 2**20:
                units.append({"index": len(units), "source": si, "files": current, "bytes": size})
                current, size = [], 0
        if current:
            units.append({"index": len(units), "source": si, "files": current, "bytes": size})
    return {"options": opts, "sources": sources, "units": units}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


NOT_DIGESTED = ("digest", "sources", "input_errors", "plan_digest")


def dataset_digest(manifest: dict) -> str:
    """The dataset's identity: its shards (names, counts, sha256), tokenizer, options and counts;
    not how the sources were spelled or where the inputs lived (local and URL copies of the same
    files give the same digest)."""
    return _digest({k: v for k, v in manifest.items() if k not in NOT_DIGESTED})


# -- running items in worker processes ----------------------------------------------------------
_CTX: Context | None = None


def _init_worker(counters) -> None:
    """Each worker adds to the shared byte and document counters about once per MiB."""
    pending = [0, 0]

    def add(i: int, n: int, every: int) -> None:
        pending[i] += n
        if pending[i] >= every:
            with counters[i].get_lock():
                counters[i].value += pending[i]
            pending[i] = 0
    _CTX.progress = lambda n: add(0, n, 1 << 20)
    _CTX.count_documents = lambda n: add(1, n, 256)


def _run_item(job):
    kind, item = job
    fn = {"scan": passes.scan_unit, "dedup": passes.dedup_partition, "write": passes.write_unit}[kind]
    return fn(_CTX, item)


def _run_phase(ctx: Context, kind: str, items: list, workers: int, total_bytes: int, show: bool, log) -> None:
    """Run items (skipping done ones) with a progress bar: input MB/s, documents and ETA."""
    global _CTX
    from tqdm import tqdm

    if not items:
        return
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{kind} ({len(items)} items)",
               disable=not show, mininterval=0.5 if tty else 30, file=sys.stderr)
    docs = [0]

    def count(n: int) -> None:
        docs[0] += n
        bar.set_postfix(documents=f"{docs[0]:,}", refresh=False)
    _CTX = ctx
    jobs = [(kind, item) for item in items]
    if workers <= 1:
        ctx.progress, ctx.count_documents = bar.update, count
        for job in jobs:
            _run_item(job)
    else:
        context = mp.get_context("fork")
        counters = (context.Value("q", 0), context.Value("q", 0))
        with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(counters,)) as pool:
            result = pool.map_async(_run_item, jobs, chunksize=1)
            while not result.ready():
                result.wait(0.25)
                count(counters[1].value - docs[0])
                bar.update(max(counters[0].value - bar.n, 0))
            result.get()  # re-raises a worker's error
    bar.update(max(total_bytes - bar.n, 0))  # workers' last partial counts
    bar.close()
    wall = time.perf_counter() - start
    if total_bytes:
        log(f"{kind}: {len(items)} items, {total_bytes / 1e6:,.1f} MB in {wall:.1f} s "
            f"({total_bytes / 1e6 / max(wall, 1e-9):.1f} MB/s with {workers} worker(s))")


# -- phases ----------------------------------------------------------------------------------------
def _pending(ctx: Context, phase: str, indices, task_index: int, task_count: int) -> list[int]:
    return [i for i in indices if i % task_count == task_index and not item_file(ctx.work, phase, i).is_file()]


def _require(ctx: Context, phase: str, indices, later: str) -> None:
    missing = [i for i in indices if not item_file(ctx.work, phase, i).is_file()]
    if missing:
        raise RuntimeError(f"phase {later} needs the earlier phase finished for every item; "
                           f"{len(missing)} are not (first: {item_file(ctx.work, phase, missing[0]).stem}); run it first")


def _train_or_copy_tokenizer(ctx: Context, log) -> None:
    opts = ctx.opts
    if (ctx.work / "tokenizer.done").is_file():
        return
    if opts["tokenizer"] == "sentencepiece":
        chosen = []
        for unit in ctx.plan["units"]:
            u = unit["index"]
            marker = json.loads(item_file(ctx.work, "scan", u, ".json").read_text())
            offset = 0
            for key, size in marker.get("sample", []):
                chosen.append((key, u, offset, size))
                offset += size
        chosen.sort()
        budget, total, picked, last = int(opts["sp_sample_mb"] * 2**20), 0, [], None
        for key, u, offset, size in chosen:
            if key == last:
                continue  # the same content in two places
            if total + size > budget and picked:
                break
            picked.append((u, offset, size))
            total, last = total + size, key

        def documents():
            for u, offset, size in picked:
                with open(item_file(ctx.work, "scan", u, ".sample"), "rb") as f:
                    f.seek(offset)
                    yield f.read(size)
        log(f"training sentencepiece {opts['sp_model_type']} ({opts['vocab_size']} pieces) on a seeded "
            f"sample of {len(picked)} train documents, {total / 1e6:.1f} MB")
        SentencePieceTokenizer.train(documents(), opts["vocab_size"], opts["sp_model_type"]).save(ctx.root)
    elif opts["tokenizer"] != "bytes":
        tok = load_tokenizer_file(opts["tokenizer"], opts["eos_token"])
        if hashlib.sha256(tok.model_bytes).hexdigest() != opts["tokenizer_sha256"]:
            raise RuntimeError(f"{opts['tokenizer']} changed since the plan was made; re-run with --overwrite")
        tok.save(ctx.root)
    (ctx.work / "tokenizer.done").write_text("ok\n")


def _finalize(ctx: Context, log) -> dict:
    opts, plan = ctx.opts, ctx.plan
    tok = ctx.tokenizer()
    splits = {s: {"documents": 0, "tokens": 0, "bytes": 0, "shards": []} for s in ("train", "val")}
    stats = {"duplicates_removed": 0, "dropped_not_utf8": 0, "dropped_not_lossless": 0}
    input_errors: dict = {}
    for unit in plan["units"]:
        u = unit["index"]
        scan = json.loads(item_file(ctx.work, "scan", u, ".json").read_text())
        for path, kinds in scan["errors"].items():
            input_errors[path] = kinds
        written = json.loads(item_file(ctx.work, "write", u, ".json").read_text())
        for key in ("duplicates_removed", "dropped_not_lossless"):
            stats[key] += written.get(key, 0)
        for split, shards in written["splits"].items():
            splits[split]["shards"] += shards
    for split in splits.values():
        for key in ("documents", "tokens", "bytes"):
            split[key] = sum(s[key] for s in split["shards"])
    bad = {}
    for kinds in input_errors.values():
        for kind, n in kinds.items():
            bad[kind] = bad.get(kind, 0) + n
    stats["dropped_not_utf8"] = bad.get("not_utf8", 0)
    manifest = {"version": MANIFEST_VERSION, "sources": [{"source": s, "weight": w} for s, w in opts["sources"]],
                "seed": opts["seed"], "val_fraction": opts["val_fraction"], "tokenizer": tok.describe(),
                "options": {k: v for k, v in opts.items() if k not in ("sources", "tokenizer")},
                "splits": splits, **stats, "bad_input": bad, "input_errors": input_errors}
    manifest["plan_digest"] = plan["digest"]  # lets a re-run of a finished prepare say so
    manifest["digest"] = dataset_digest(manifest)
    for name, split in splits.items():
        log(f"{name}: {split['documents']:,} documents, {split['bytes']:,} bytes, {split['tokens']:,} tokens, "
            f"{len(split['shards'])} shards")
    if any(stats.values()) or bad:
        shown = {"duplicates_removed": stats["duplicates_removed"], "dropped_not_lossless": stats["dropped_not_lossless"],
                 **{f"bad input: {k}": v for k, v in bad.items()}}
        log("dropped: " + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in shown.items() if v))
        for path, kinds in list(input_errors.items())[:10]:
            log(f"  {path}: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in kinds.items()))
        if len(input_errors) > 10:
            log(f"  ... and {len(input_errors) - 10} more files (manifest.json: input_errors)")
    kept = splits["train"]["documents"] + splits["val"]["documents"]
    if stats["dropped_not_lossless"] > 0.01 * (kept + stats["dropped_not_lossless"]):
        log(f"warning: {stats['dropped_not_lossless']:,} documents dropped because the tokenizer does not "
            "reproduce them exactly (normalization, collapsed whitespace, special-token text)")
    if not splits["train"]["documents"]:
        raise RuntimeError(f"no train document is left ({kept} kept in val; bad input, duplicates and lossy "
                           f"tokenization: {json.dumps({**stats, **bad})}); nothing was written to the output")
    write_manifest(ctx.root, manifest)
    return manifest


def _clean(out: Path) -> None:
    """Remove the work files a finished dataset no longer needs."""
    if (out / "_work").exists():
        shutil.rmtree(out / "_work")
    (out / PLAN_FILE).unlink(missing_ok=True)


def prepare(sources: str | list[str], out: str | Path, *, tokenizer: str = "bytes",
            vocab_size: int = 4096, sp_model_type: str = "bpe", sp_sample_mb: float = 64.0,
            val_fraction: float = 0.1, shard_mb: float = 1.0, seed: int = 0,
            text_field: str = "text", group_field: str | None = None, unit_mb: float = 64.0,
            dedup_partitions: int = 64, on_error: str = "skip", eos_token: str | None = None,
            storage_options: dict | None = None, workers: int = 1, phase: str = "all",
            task_index: int = 0, task_count: int = 1, overwrite: bool = False,
            progress: bool = False, log=print) -> dict | None:
    """Prepare a dataset (or one phase of it, for this task); returns the manifest once finalized."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker: scale with workers
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if phase not in ("all",) + PHASES:
        raise ValueError(f"phase={phase!r} (allowed: all, {', '.join(PHASES)})")
    if not 0 <= task_index < task_count:
        raise ValueError(f"task index {task_index} is not in [0, {task_count})")
    opts = options(sources, tokenizer=tokenizer, vocab_size=vocab_size, sp_model_type=sp_model_type,
                   sp_sample_mb=sp_sample_mb, val_fraction=val_fraction, shard_mb=shard_mb, seed=seed,
                   text_field=text_field, group_field=group_field, unit_mb=unit_mb,
                   dedup_partitions=dedup_partitions, on_error=on_error, eos_token=eos_token)
    phases = PHASES if phase == "all" else (phase,)
    finished = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() and not overwrite else None
    if "plan" in phases:
        plan = make_plan(opts, storage_options)
        plan["digest"] = _digest(plan)
        if finished is not None and finished.get("plan_digest") == plan["digest"]:
            _clean(out)  # a finalize killed while cleaning up
            log(f"{out} is already prepared from these inputs and options (digest {finished['digest']})")
            return finished
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
            shutil.rmtree(out)
        if overwrite and partial.exists():
            shutil.rmtree(partial)
        if (partial / PLAN_FILE).is_file():
            old = json.loads((partial / PLAN_FILE).read_text())
            if old.get("digest") != plan["digest"]:
                raise FileExistsError(
                    f"{partial} holds an unfinished prepare with other options or inputs; re-run that "
                    "command to finish it, or pass --overwrite to start this one over")
            log(f"resuming the unfinished prepare in {partial}")
        for sub in ("scan", "dedup", "write"):
            (partial / "_work" / sub).mkdir(parents=True, exist_ok=True)
        if not (partial / PLAN_FILE).is_file():
            write_json(partial / PLAN_FILE, plan)
        log(f"plan: {sum(s['files'] for s in plan['sources']):,} files, "
            f"{sum(s['bytes'] for s in plan['sources']) / 1e6:,.1f} MB in {len(plan['units'])} units")
    else:
        if finished is not None and not partial.exists():
            log(f"{out} is already prepared (digest {finished['digest']}); phase {phase} has nothing to do")
            return finished if task_index == 0 else None
        if not (partial / PLAN_FILE).is_file():
            raise FileNotFoundError(f"{partial / PLAN_FILE} not found: run the plan phase first")
        plan = json.loads((partial / PLAN_FILE).read_text())
        if plan["options"] != opts:
            raise ValueError(f"{partial / PLAN_FILE} was made with other options; pass the same ones")
    ctx = Context(partial, plan, storage_options)
    units = plan["units"]
    unit_ids = [u["index"] for u in units]
    parts = list(range(opts["dedup_partitions"]))
    for name in phases[1:] if phases[0] == "plan" else phases:
        if name == "scan":
            todo = _pending(ctx, "scan", unit_ids, task_index, task_count)
            _run_phase(ctx, "scan", [units[i] for i in todo], workers, sum(units[i]["bytes"] for i in todo),
                       progress, log)
        elif name == "dedup":
            _require(ctx, "scan", unit_ids, "dedup")
            todo = _pending(ctx, "dedup", parts, task_index, task_count)
            _run_phase(ctx, "dedup", todo, workers, 0, False, log)
        elif name == "tokenizer":
            _require(ctx, "scan", unit_ids, "tokenizer")
            if task_index == 0:
                _train_or_copy_tokenizer(ctx, log)
        elif name == "write":
            _require(ctx, "dedup", parts, "write")
            if not (ctx.work / "tokenizer.done").is_file():
                raise RuntimeError("phase write needs the tokenizer phase finished; run it first")
            todo = _pending(ctx, "write", unit_ids, task_index, task_count)
            _run_phase(ctx, "write", [units[i] for i in todo], workers, sum(units[i]["bytes"] for i in todo),
                       progress, log)
        elif name == "finalize":
            _require(ctx, "write", unit_ids, "finalize")
            if task_index != 0:
                continue
            manifest = _finalize(ctx, log)
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                shutil.rmtree(out)
            partial.rename(out)  # the one step that makes the dataset appear, complete
            _clean(out)
            log(f"manifest digest {manifest['digest']}")
            return manifest
    return None


def manifest_digest(data_dir: str | Path) -> str:
    return json.loads((Path(data_dir) / MANIFEST).read_text())["digest"]

