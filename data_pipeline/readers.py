"""Stream documents out of one input file: a text file (one document), JSON Lines (plain, .gz or
.zst; one document per line) or Parquet (a text column, one row group at a time), local or
through fsspec. Nothing is read whole: memory is one row group or one decompressed chunk.

Bad input is yielded as a ``Bad`` record (kind and where) instead of a document, so a long job
counts it and goes on; ``prepare --on-error fail`` turns the first one into an error.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from .sources import InputFile, is_url

try:
    import orjson

    _loads, _JSONError = orjson.loads, orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    import json

    _loads, _JSONError = json.loads, ValueError

CHUNK = 1 << 20
BAD_KINDS = ("malformed_json", "missing_field", "not_utf8", "empty", "truncated")


@dataclass(frozen=True)
class Bad:
    kind: str    # one of BAD_KINDS
    where: str   # file and line / row group


class InputError(RuntimeError):
    """--on-error fail: the first bad input, named by file and line or row group."""


def open_input(path: str, storage_options: dict | None = None):
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb", **(storage_options or {})).open()
    return open(path, "rb")


def _raw_chunks(f, progress: Callable[[int], None]) -> Iterator[bytes]:
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return
        progress(len(chunk))
        yield chunk


def _decompressed(chunks: Iterator[bytes], name: str) -> Iterator[bytes]:
    """gzip / zstd members one after another; raises EOFError when the last one is cut short."""
    lower = name.lower()
    if lower.endswith(".gz"):
        make = lambda: zlib.decompressobj(wbits=31)  # noqa: E731 - gzip header and trailer
    elif lower.endswith(".zst"):
        import zstandard

        make = lambda: zstandard.ZstdDecompressor().decompressobj()  # noqa: E731
    else:
        yield from chunks
        return
    obj, pending = make(), False
    for chunk in chunks:
        while chunk:
            out = obj.decompress(chunk)
            pending = True
            if out:
                yield out
            if obj.eof:
                chunk, obj, pending = obj.unused_data, make(), False
            else:
                chunk = b""
    if pending and not obj.eof:
        raise EOFError("compressed stream ends before its end marker")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines of a chunk stream; a line longer than a chunk is joined once, not per chunk."""
    pending: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        parts[0] = b"".join(pending) + parts[0] if pending else parts[0]
        last = parts.pop()
        pending = [last] if last else []
        yield from parts
    if pending:
        yield b"".join(pending)


def _as_text(value, where: str) -> bytes | Bad:
    if not isinstance(value, str):
        return Bad("missing_field", where)
    if not value:
        return Bad("empty", where)
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return Bad("not_utf8", where)


def _jsonl(f: InputFile, fh, text_field: str, group_field: str | None, progress) -> Iterator:
    line_no = 0
    try:
        for line in _lines(_decompressed(_raw_chunks(fh, progress), f.name)):
            line_no += 1
            if not line.strip():
                continue
            where = f"{f.path}:{line_no}"
            try:
                obj = _loads(line)
            except _JSONError:
                try:
                    line.decode("utf-8")
                    yield Bad("malformed_json", where)
                except UnicodeDecodeError:
                    yield Bad("not_utf8", where)
                continue
            if not isinstance(obj, dict) or text_field not in obj:
                yield Bad("missing_field", where)
                continue
            data = _as_text(obj[text_field], where)
            group = None
            if group_field is not None:
                group = obj.get(group_field)
                if group is None:
                    yield Bad("missing_field", where)
                    continue
                group = str(group)
            yield data if isinstance(data, Bad) else (f"{f.name}:{line_no}", group, data)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        yield Bad("truncated", f"{f.path}: after line {line_no} ({type(exc).__name__}: {exc})")


def _parquet(f: InputFile, fh, text_field: str, group_field: str | None, progress) -> Iterator:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
    except Exception as exc:  # ArrowInvalid / OSError: footer missing or damaged
        yield Bad("truncated", f"{f.path}: not a readable Parquet file ({type(exc).__name__}: {exc})")
        return
    columns = [text_field] + ([group_field] if group_field else [])
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        yield Bad("missing_field", f"{f.path}: no column {missing[0]!r} (has {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    for rg in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(rg, columns=columns)
        except Exception as exc:
            yield Bad("truncated", f"{f.path}: row group {rg} ({type(exc).__name__}: {exc})")
            row += pf.metadata.row_group(rg).num_rows
            continue
        progress(pf.metadata.row_group(rg).total_byte_size)
        texts = table.column(text_field).to_pylist()
        groups = table.column(group_field).to_pylist() if group_field else [None] * len(texts)
        for text, group in zip(texts, groups):
            where = f"{f.path}: row group {rg}, row {row}"
            data = _as_text(text, where)
            if isinstance(data, Bad):
                yield data
            elif group_field and group is None:
                yield Bad("missing_field", where)
            else:
                yield f"{f.name}:{row}", (None if group is None else str(group)), data
            row += 1


def _text(f: InputFile, fh, progress) -> Iterator:
    try:
        data = b"".join(_raw_chunks(fh, progress))  # one document: the file (bounded by the file)
    except OSError as exc:
        yield Bad("truncated", f"{f.path}: ({type(exc).__name__}: {exc})")
        return
    yield (f.name, None, data) if data else Bad("empty", f.path)


def read_documents(f: InputFile, *, text_field: str = "text", group_field: str | None = None,
                   storage_options: dict | None = None,
                   progress: Callable[[int], None] = lambda n: None) -> Iterator:
    """Yield ``(name, group or None, bytes)`` per document, or ``Bad`` records, in file order."""
    try:
        fh = open_input(f.path, storage_options)
    except (OSError, ValueError) as exc:
        yield Bad("truncated", f"{f.path}: cannot open ({type(exc).__name__}: {exc})")
        return
    with fh:
        if f.fmt == "jsonl":
            yield from _jsonl(f, fh, text_field, group_field, progress)
        elif f.fmt == "parquet":
            yield from _parquet(f, fh, text_field, group_field, progress)
        else:
            yield from _text(f, fh, progress)
