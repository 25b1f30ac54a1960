"""Packed-sequence throughput of the streaming loader, with 1 and 2 DataLoader workers.

Counts source bytes delivered in packed training batches (tokens x the dataset's mean bytes
per token) per wall-clock second, after a warm-up, in the consuming process: what the trainer
would see. Per-worker figures divide by the worker count.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_pipeline.loader import StreamingLoader
from data_pipeline.shards import read_manifest


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
        seconds: float = 5.0) -> dict:
    runs = [measure(data_dir, w, seq_len, micro_batch, seconds) for w in (1, 2)]
    results = {"benchmark": "data", "data": str(data_dir), "seq_len": seq_len,
               "micro_batch_size": micro_batch, "runs": runs,
               "mb_per_s_per_worker": min(r["mb_per_s_per_worker"] for r in runs)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'workers':>8} {'batches/s':>10} {'MB/s':>10} {'MB/s/worker':>12}")
    for r in runs:
        print(f"{r['workers']:>8} {r['batches'] / r['seconds']:>10.1f} {r['mb_per_s']:>10.1f} "
              f"{r['mb_per_s_per_worker']:>12.1f}")
    print(f"packed {seq_len}-token sequences, batch {micro_batch}; results in {out}/results.json")
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="packed-sequence throughput of the loader, 1 and 2 workers",
                       description="Streams packed training batches from a prepared dataset with "
                                   "1 and then 2 DataLoader workers and reports MB/s of source "
                                   "bytes delivered, in total and per worker.")
    p.add_argument("--data", required=True, help="dataset directory written by data_pipeline prepare")
    p.add_argument("--out", required=True, help="output directory for results.json")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per run (default 5)")
    return p


def main(args) -> int:
    run(args.data, args.out, args.seq_len, args.micro_batch, args.seconds)
    return 0
