"""webdataset tar shards and their manifest.

One sample per document: ``tok`` holds the token ids (little-endian, dtype from the manifest),
``json`` the document's name, byte count and tokenizer fingerprint. ``manifest.json`` records
per shard the documents, tokens, bytes, sha256 and tokenizer fingerprint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: names of every document in the manifest (before streaming prepare)


class ShardError(RuntimeError):
    """A shard or manifest is missing, truncated or altered; the message names it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardSetWriter:
    """Writes documents into ``<prefix>-NNNNN.tar`` files of about ``target_bytes`` each."""

    def __init__(self, out_dir: Path, prefix: str, target_bytes: int, token_dtype,
                 fingerprint: str) -> None:
        self.out_dir, self.prefix, self.target_bytes = out_dir, prefix, target_bytes
        self.fingerprint = fingerprint
        self.dtype = np.dtype(token_dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self.documents = 0  # written so far, over all shards
        self._writer = None
        self._current: dict = {}

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.tar"
        self._current = {"name": name, "documents": 0, "tokens": 0, "bytes": 0,
                         "tokenizer": self.fingerprint}
        self._file = open(self.out_dir / name, "wb")
        self._writer = tarfile.open(fileobj=self._file, mode="w|")

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self._writer = None
        path = self.out_dir / self._current["name"]
        self._current["size"] = path.stat().st_size
        self._current["sha256"] = sha256_file(path)
        self.shards.append(self._current)

    def write(self, key: str, name: str, tokens: np.ndarray, n_bytes: int) -> None:
        if self._writer is None:
            self._open()
        meta = json.dumps({"name": name, "bytes": n_bytes, "tokenizer": self.fingerprint}).encode()
        for ext, payload in (("json", meta), ("tok", tokens.astype(self.dtype).tobytes())):
            self._add(f"{key}.{ext}", payload)
        self._current["documents"] += 1
        self.documents += 1
        self._current["tokens"] += int(tokens.size)
        self._current["bytes"] += int(n_bytes)
        if self._current["tokens"] * self.dtype.itemsize >= self.target_bytes:
            self._close()

    def _add(self, member: str, payload: bytes) -> None:
        """One tar member as webdataset's TarWriter writes it, with mtime 0: the same documents
        give byte-identical shards (and manifest hashes), without importing webdataset (and torch)
        into prepare's processes."""
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o444, "bigdata", "bigdata"
        self._writer.addfile(info, io.BytesIO(payload))

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / MANIFEST)


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: prepare the dataset first with "
                         f"`python -m data_pipeline prepare --source shakespeare --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); re-run data_pipeline prepare") from None
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r} is not supported "
                         f"(this code reads {', '.join(map(str, READABLE_VERSIONS))}); re-run "
                         "data_pipeline prepare with this version")
    return manifest


def iter_shard_documents(path: Path, token_dtype: str, fingerprint: str | None = None,
                         with_names: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, token ids) for every document of one shard, in stored order (the document's
    name instead of the key ``with_names``); with ``fingerprint``, a document written by another
    tokenizer is an error."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; re-run data_pipeline prepare or restore the file")
    import webdataset as wds

    dtype = np.dtype(token_dtype).newbyteorder("<")
    dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=_all_shards,
                             workersplitter=_all_shards, empty_check=False)
    try:
        for sample in dataset:
            if "tok" not in sample:
                raise ShardError(f"shard {path}: sample {sample.get('__key__')!r} has no 'tok' field")
            meta = json.loads(sample["json"]) if (fingerprint is not None or with_names) and "json" in sample else {}
            if fingerprint is not None:
                written_by = meta.get("tokenizer")
                if written_by != fingerprint:
                    raise ShardError(f"shard {path} was written by tokenizer {written_by!r}, but this "
                                     f"dataset's manifest says {fingerprint!r}: shards from another "
                                     "preparation were mixed in; re-run data_pipeline prepare")
            yield meta.get("name") if with_names else sample["__key__"], np.frombuffer(sample["tok"], dtype=dtype)
    except ShardError:
        raise
    except Exception as exc:  # tarfile/webdataset errors on truncated or altered files
        raise ShardError(f"shard {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                         f"run `python -m data_pipeline verify {path.parent}`") from None


def iter_documents(data_dir: str | Path, split: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, token ids) of every document of a split, in stored order."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for shard in manifest["splits"][split]["shards"]:
        yield from iter_shard_documents(data_dir / shard["name"], manifest["tokenizer"]["dtype"],
                                        with_names=True)


def _all_shards(urls):
    """Our loader splits data across ranks itself; webdataset must not split again."""
    return urls
