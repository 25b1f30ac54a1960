"""Where a prepared dataset lives: a local directory, or a URL (``http(s)://``, ``s3://``, any
fsspec protocol), read the same way and checked the same way.

Every shard reaches the loader as bytes whose sha256 matched the manifest: it is read whole (a
shard is ``--shard-mb`` of tokens, 1 MiB by default), hashed, and only then parsed, so a damaged
or altered shard never puts a document in a batch. Remote reads have a timeout and are retried on
connection errors, timeouts and HTTP 5xx/429 with exponential backoff; when the retry budget is
spent the read fails with ``StoreError``, one line naming the URL and the last error (never the
credentials, which come from the usual AWS environment and files, not from configs).

An optional local cache (``cache_dir``, bounded by ``cache_gb``) keeps verified shards under
their sha256, so a second run, another rank or another DataLoader worker on the node reads the
store once; files are written under a temporary name and renamed (never torn), and the least
recently used are evicted past the bound.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import ShardError
from .sources import is_url


class StoreError(RuntimeError):
    """The store could not be read within the retry budget; the message names the URL."""


@dataclass(frozen=True)
class StoreOptions:
    s3_endpoint: str = ""        # S3-compatible endpoint (else $AWS_ENDPOINT_URL / AWS's own)
    timeout_s: float = 30.0      # per request
    retries: int = 5             # attempts after the first
    backoff_s: float = 0.5       # first wait; doubles each retry
    max_backoff_s: float = 10.0
    cache_dir: str = ""          # verified shards kept here ("" = no cache)
    cache_gb: float = 10.0       # bound of the cache, least recently used evicted


_DEFAULTS = StoreOptions()


def configure(options: StoreOptions) -> None:
    """The options every ``DataStore`` of this process (and its forked workers) uses by default."""
    global _DEFAULTS
    _DEFAULTS = options


def redact(url: str) -> str:
    """A URL without any user:password@ part, for messages and logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url)


def _transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, HTTP 5xx and 429."""
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return isinstance(code, int) and (code >= 500 or code == 429)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, OSError)):
        return True
    name = type(exc).__module__ + "." + type(exc).__name__
    return any(part in name for part in ("aiohttp", "ClientError", "Timeout", "Disconnected", "EndpointConnection",
                                          "ConnectionClosed", "ReadTimeout", "ConnectTimeout"))


class _HttpStatus(OSError):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


class DataStore:
    """A dataset root. Local paths are read directly; ``http(s)://`` with urllib3 (a pooled
    keep-alive connection; half the client CPU per shard of fsspec's aiohttp path, measured);
    other URLs through fsspec. One client per process (a forked DataLoader worker makes its own)."""

    def __init__(self, root: str | Path, options: StoreOptions | None = None):
        self.root = str(root).rstrip("/") if is_url(root) else str(root)
        self.remote = is_url(root)
        self.options = options or _DEFAULTS
        self._fs, self._pid = None, None
        self._http, self._http_pid = None, None

    def where(self, name: str = "") -> str:
        if not name:
            return redact(self.root)
        return redact(f"{self.root}/{name}") if self.remote else str(Path(self.root) / name)

    def _filesystem(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            protocol = self.root.split("://", 1)[0]
            kwargs: dict = {"skip_instance_cache": True}
            if protocol in ("s3", "s3a"):
                endpoint = self.options.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
                kwargs["config_kwargs"] = {"connect_timeout": self.options.timeout_s, "read_timeout": self.options.timeout_s,
                                           "retries": {"max_attempts": 1}}  # our policy, not botocore's
                if endpoint:
                    kwargs["endpoint_url"] = endpoint
            try:
                self._fs = fsspec.filesystem(protocol, **kwargs)
            except TypeError:  # a filesystem without those options
                self._fs = fsspec.filesystem(protocol, skip_instance_cache=True)
            if hasattr(self._fs, "retries"):
                self._fs.retries = 1  # s3fs's own retry loop: ours decides
            self._pid = os.getpid()
        return self._fs

    def _http_get(self, url: str) -> bytes:
        """GET a whole object over HTTP(S), redirects followed, nothing retried here (``_fetch``
        decides); a short body is a transient error, as a dropped connection is."""
        import urllib3

        if self._http is None or self._http_pid != os.getpid():
            self._http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=self.options.timeout_s, read=self.options.timeout_s),
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                      raise_on_status=False))
            self._http_pid = os.getpid()
        try:
            response = self._http.request("GET", url)
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            if isinstance(reason, urllib3.exceptions.SSLError):
                raise PermissionError(f"TLS: {_clean(reason)}") from None
            raise ConnectionError(f"{type(reason).__name__}: {_clean(reason)}") from None
        if response.status == 404:
            raise FileNotFoundError(redact(url))
        if response.status != 200:
            raise _HttpStatus(response.status, response.reason or "")
        return response.data

    def _fetch(self, name: str) -> bytes:
        """The whole object, retried; FileNotFoundError when it does not exist."""
        if not self.remote:
            return (Path(self.root) / name).read_bytes()
        url, opts = f"{self.root}/{name}", self.options
        delay, start, last = opts.backoff_s, time.monotonic(), None
        for attempt in range(opts.retries + 1):
            try:
                if url.startswith(("http://", "https://")):
                    return self._http_get(url)
                return self._filesystem().cat_file(url)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _transient(exc):
                    if isinstance(exc, FileNotFoundError) or "404" in str(exc) or "NoSuchKey" in str(exc):
                        raise FileNotFoundError(redact(url)) from None
                    raise StoreError(f"{redact(url)}: {type(exc).__name__}: {_clean(exc)}") from None
                last = exc
            if attempt < opts.retries:
                time.sleep(min(delay, opts.max_backoff_s))
                delay *= 2
        raise StoreError(f"{redact(url)}: unreachable after {opts.retries + 1} attempts in "
                         f"{time.monotonic() - start:.0f} s (last error {type(last).__name__}: {_clean(last)}); "
                         "the run can be resumed when the store is back (data.retries, data.timeout_s)")

    def read_bytes(self, name: str) -> bytes:
        return self._fetch(name)

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (Path(self.root) / name).is_file()
        try:
            self._fetch(name)
            return True
        except FileNotFoundError:
            return False

    # -- shards ----------------------------------------------------------------------------------
    def shard_bytes(self, name: str, size: int | None, sha256: str | None) -> bytes:
        """A shard's bytes, checked against the manifest (size and sha256) before they are used."""
        cached = self._cache_path(sha256)
        if cached is not None:
            try:
                data = cached.read_bytes()
                if hashlib.sha256(data).hexdigest() == sha256:
                    os.utime(cached)  # recently used
                    return data
                cached.unlink(missing_ok=True)  # damaged in the cache: fetch again
            except FileNotFoundError:
                pass  # not cached, or evicted by another process meanwhile
        try:
            data = self._fetch(name)
        except FileNotFoundError:
            raise ShardError(f"shard {self.where(name)} is missing; re-run data_pipeline prepare or restore "
                             "the file") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise ShardError(f"shard {self.where(name)} cannot be read ({type(exc).__name__})") from None
        if size is not None and len(data) != size:
            raise ShardError(f"shard {self.where(name)} has {len(data):,} bytes, the manifest says {size:,} "
                             f"({'truncated' if len(data) < size else 'altered'}); "
                             f"run `python -m data_pipeline verify {self.where()}`")
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ShardError(f"shard {self.where(name)}: sha256 differs from the manifest (altered); "
                             f"run `python -m data_pipeline verify {self.where()}`")
        if cached is not None:
            self._cache_put(cached, data)
        return data

    def _cache_path(self, sha256: str | None) -> Path | None:
        if not self.remote or not self.options.cache_dir or not sha256:
            return None  # a local dataset is read where it is
        return Path(self.options.cache_dir) / sha256[:2] / f"{sha256}.tar"

    def _cache_put(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the whole file or none
        evict(Path(self.options.cache_dir), int(self.options.cache_gb * 2**30), keep=path)


def evict(cache_dir: Path, bound: int, keep: Path | None = None) -> int:
    """Delete the least recently used cached shards until the cache holds at most ``bound``
    bytes; returns the bytes left. Safe beside other processes doing the same."""
    entries = []
    for path in cache_dir.glob("*/*.tar"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= bound:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
    return total


def _clean(exc: BaseException | None) -> str:
    return redact(" ".join(str(exc).split()))[:300] if exc is not None else "?"
