"""Packed-sequence throughput of the streaming loader, with 1 and 2 DataLoader workers.

Counts source bytes delivered in packed training batches (tokens x the dataset's mean bytes
per token) per wall-clock second, after a warm-up, in the consuming process: what the trainer
would see. Per-worker figures divide by the worker count. ``--data`` may be a URL; ``--remote``
serves a local dataset from a real HTTP server and a real S3-compatible server on 127.0.0.1 and
measures both beside local disk in the same run (each server in its own process; every shard
checked against its sha256, no cache: each shard crosses the network, the next one prefetched).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from data_pipeline.loader import StreamingLoader
from data_pipeline.shards import read_manifest
from data_pipeline.storage import is_url, redact


def measure(data_dir: str, workers: int, seq_len: int, micro_batch: int, seconds: float,
            warmup_batches: int = 8) -> dict:
    split = read_manifest(data_dir)["splits"]["train"]
    bytes_per_token = split["bytes"] / max(split["tokens"], 1)
    loader = StreamingLoader(data_dir, "train", seq_len, micro_batch, num_workers=workers, seed=0)
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    tokens, count, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(batches)["input_ids"].numel()
        count += 1
    wall = time.perf_counter() - start
    del batches  # shuts the workers down
    mb_per_s = tokens * bytes_per_token / wall / 1e6
    return {"workers": workers, "batches": count, "seconds": wall, "tokens_per_s": tokens / wall,
            "mb_per_s": mb_per_s, "mb_per_s_per_worker": mb_per_s / workers}


def run(data_dir: str, out: str, seq_len: int = 2048, micro_batch: int = 8,
        seconds: float = 5.0, remote: bool = False, rounds: int = 1) -> dict:
    from pretrain.bench import provenance

    stores = {"local": data_dir}
    servers = []
    if remote:
        if is_url(data_dir):
            raise SystemExit("bench data: --remote serves a local dataset directory; give --data a path")
        from pretrain.bench.servers import ProcessHttpStore, S3Store

        http, s3 = ProcessHttpStore(data_dir), S3Store(data_dir, own_process=True)
        servers = [http, s3]
        os.environ.update(s3.env)  # dummy keys for the local server only
        stores.update(http=http.url, s3=s3.url)
    elif is_url(data_dir):
        stores = {data_dir.split("://", 1)[0]: data_dir}
    configs = [(name, root, w) for w in (1, 2) for name, root in stores.items()]
    samples: dict = {}
    try:
        # Rounds interleave the stores, so a load that drifts during the run (other jobs on the
        # node) moves every store's figures alike; each figure is the median over rounds.
        for round_no in range(rounds):
            for name, root, w in configs:
                samples.setdefault((name, w), []).append(measure(root, w, seq_len, micro_batch, seconds))
            if rounds > 1:
                print(f"round {round_no + 1}/{rounds} done", flush=True)
    finally:
        for server in servers:
            server.stop()
    runs = []
    for name, root, w in configs:
        median = sorted(samples[(name, w)], key=lambda r: r["mb_per_s"])[len(samples[(name, w)]) // 2]
        runs.append({"store": name, "url": redact(str(root)), **median, "rounds": rounds,
                     "mb_per_s_rounds": [r["mb_per_s"] for r in samples[(name, w)]]})
    by = {(r["store"], r["workers"]): r["mb_per_s"] for r in runs}
    results = {"benchmark": "data", "data": redact(str(data_dir)), "seq_len": seq_len,
               "micro_batch_size": micro_batch, "runs": runs,
               "mb_per_s_per_worker": min(r["mb_per_s_per_worker"] for r in runs if r["store"] == next(iter(stores))),
               "remote_vs_local": {f"{s}_{w}w": by[(s, w)] / by[("local", w)] for s in stores if s != "local"
                                   for w in (1, 2)} if remote else {},
               "commit": provenance.commit(), "date": provenance.utc_now(), "hardware": provenance.hardware(),
               "dataset": provenance.dataset(data_dir)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'store':>6} {'workers':>8} {'batches/s':>10} {'MB/s':>10} {'MB/s/worker':>12} {'vs local':>9}")
    for r in runs:
        ratio = r["mb_per_s"] / by[("local", r["workers"])] if ("local", r["workers"]) in by else float("nan")
        print(f"{r['store']:>6} {r['workers']:>8} {r['batches'] / r['seconds']:>10.1f} {r['mb_per_s']:>10.1f} "
              f"{r['mb_per_s_per_worker']:>12.1f} {ratio:>8.2f}x")
    print(f"packed {seq_len}-token sequences, batch {micro_batch}, median of {rounds} interleaved round(s); "
          f"results in {out}/results.json")
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="packed-sequence throughput of the loader, 1 and 2 workers",
                       description="Streams packed training batches from a prepared dataset with "
                                   "1 and then 2 DataLoader workers and reports MB/s of source "
                                   "bytes delivered, in total and per worker.")
    p.add_argument("--data", required=True, help="dataset written by data_pipeline prepare: a directory or a URL")
    p.add_argument("--remote", action="store_true",
                   help="also serve --data over HTTP and S3 (moto) on 127.0.0.1 and measure both beside local disk")
    p.add_argument("--out", required=True, help="output directory for results.json")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure every store and worker count this many times, interleaved; the median "
                        "is reported (default 3)")
    return p


def main(args) -> int:
    if args.rounds < 1:
        raise SystemExit("bench data: --rounds must be at least 1")
    run(args.data, args.out, args.seq_len, args.micro_batch, args.seconds, args.remote, args.rounds)
    return 0
