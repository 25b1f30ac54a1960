"""Plot set-up for every PNG the stack writes (reports, benchmarks, inspect-attention): headless
matplotlib, laid out, saved and closed in one place."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: str | Path, *grid, dpi: int = 120, **subplots):
    """``with figure(path, 1, 2, figsize=(11, 4)) as (fig, axes):`` draws, then saves ``path``;
    arguments after the path are those of ``plt.subplots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
