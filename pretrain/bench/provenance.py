"""What every benchmark records beside its numbers: the code's commit, the machine, the date, the
dataset."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict:
    import torch

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def busy_warning() -> str | None:
    """A warning when other processes already load the CPUs: timings taken now are off, and
    torch's worker threads spin against them (seen here: a 2-thread forward 100x slower)."""
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < 0.75 * cpus:
        return None
    return (f"warning: the 1-minute load average is {load:.1f} on {cpus} CPUs: other processes are using "
            "the machine, so speed and memory numbers measured now will be off")


def _manifest_bytes(path: str | Path) -> bytes | None:
    """A local or remote (URL) dataset's manifest.json, None without one."""
    from data_pipeline.storage import DataStore, StoreError

    try:
        return DataStore(path).read_bytes("manifest.json")
    except (FileNotFoundError, NotADirectoryError, StoreError):
        return None


def dataset_digest(path: str | Path) -> str | None:
    """The first 12 hex digits of the dataset's manifest.json sha256 (shards are byte-reproducible,
    so this names the data); None without a manifest."""
    raw = _manifest_bytes(path)
    return _digest(raw) if raw is not None else None


def _digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()[:12]


def dataset(path: str | Path) -> dict:
    """Which data a benchmark trained and evaluated on: path, manifest digest, documents per split."""
    from data_pipeline.storage import redact

    raw = _manifest_bytes(path)
    if raw is None:
        return {"path": redact(str(path)), "manifest_sha256": None, "documents": {}}
    splits = {name: split.get("documents") for name, split in json.loads(raw)["splits"].items()}
    return {"path": redact(str(path)), "manifest_sha256": _digest(raw), "documents": splits}


def describe_dataset(data: dict) -> str:
    docs = ", ".join(f"{n} {split}" for split, n in data["documents"].items())
    return f"`{data['path']}` (manifest {data['manifest_sha256'] or 'missing'}; documents: {docs or '?'})"


def describe(hw: dict) -> str:
    """One line for a report: where the numbers were measured."""
    return f"{hw['processor']}, {hw['cpus']} CPUs, GPU {hw['gpu'] or 'none'}, torch {hw['torch']}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
