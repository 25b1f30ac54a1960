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

from .errors import ShardError  # raised here, imported from here by most callers

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: names of every document in the manifest (before streaming prepare)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _HashingFile:
    """A file opened for writing that hashes what goes through it (no read-back)."""

    def __init__(self, path: Path):
        self._f, self.hash, self.size = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()


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
        self._file = _HashingFile(self.out_dir / name)
        self._writer = tarfile.open(fileobj=self._file, mode="w|")

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # writes the tar end blocks through the file
        self._file.close()
        self._writer = None
        self._current["size"], self._current["sha256"] = self._file.size, self._file.hash.hexdigest()
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
    """The manifest of a local or remote (URL) dataset."""
    from .storage import DataStore, StoreError

    store = DataStore(data_dir)
    where = store.where(MANIFEST)
    try:
        text = store.read_bytes(MANIFEST).decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise ShardError(f"{where} not found: prepare the dataset first with "
                         f"`python -m data_pipeline prepare --source shakespeare --out {store.where()}`") from None
    except StoreError as exc:
        raise ShardError(f"cannot read the manifest: {exc}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{where} is not valid JSON ({exc}); re-run data_pipeline prepare") from None
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{where}: manifest version {manifest.get('version')!r} is not supported "
                         f"(this code reads {', '.join(map(str, READABLE_VERSIONS))}); re-run "
                         "data_pipeline prepare with this version")
    return manifest


def parse_shard(data: bytes, where: str, token_dtype: str, fingerprint: str | None = None,
                vocab_size: int | None = None, with_names: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, token ids) for every document of a shard's bytes, in stored order (the
    document's name instead of the key ``with_names``). With ``fingerprint``, a document written
    by another tokenizer is an error; with ``vocab_size``, so is an id outside the vocabulary."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    dtype = np.dtype(token_dtype).newbyteorder("<")
    folder = where.rsplit("/", 1)[0]
    try:
        members = ({**m, "__url__": where} for m in tar_file_iterator(io.BytesIO(data)))
        for sample in group_by_keys(members):
            if "tok" not in sample:
                raise ShardError(f"shard {where}: sample {sample.get('__key__')!r} has no 'tok' field")
            meta = json.loads(sample["json"]) if (fingerprint is not None or with_names) and "json" in sample else {}
            if fingerprint is not None:
                written_by = meta.get("tokenizer")
                if written_by != fingerprint:
                    raise ShardError(f"shard {where} was written by tokenizer {written_by!r}, but this "
                                     f"dataset's manifest says {fingerprint!r}: shards from another "
                                     "preparation were mixed in; re-run data_pipeline prepare")
            tokens = np.frombuffer(sample["tok"], dtype=dtype)
            if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
                raise ShardError(f"shard {where}: document {sample['__key__']!r} holds token id {int(tokens.max())}, "
                                 f"outside the tokenizer's {vocab_size} ids (altered); "
                                 f"run `python -m data_pipeline verify {folder}`")
            yield meta.get("name") if with_names else sample["__key__"], tokens
    except ShardError:
        raise
    except Exception as exc:  # tarfile/webdataset errors on truncated or altered files
        raise ShardError(f"shard {where} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                         f"run `python -m data_pipeline verify {folder}`") from None


def iter_shard_documents(path: Path, token_dtype: str, fingerprint: str | None = None,
                         with_names: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """``parse_shard`` of a local shard file (no checksum: the loader checks shards against the
    manifest through ``storage.DataStore``)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; re-run data_pipeline prepare or restore the file")
    yield from parse_shard(path.read_bytes(), str(path), token_dtype, fingerprint, with_names=with_names)


def iter_documents(data_dir: str | Path, split: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, token ids) of every document of a split of a local or remote dataset, in stored
    order, each shard checked against the manifest."""
    from .storage import DataStore

    store = DataStore(data_dir)
    manifest = read_manifest(data_dir)
    for shard in manifest["splits"][split]["shards"]:
        data = store.shard_bytes(shard["name"], shard.get("size"), shard.get("sha256"))
        yield from parse_shard(data, store.where(shard["name"]), manifest["tokenizer"]["dtype"], with_names=True)
