"""Fixtures: a small real text corpus and dataset, and an in-process session with megatron's
parallel state set up; plain helpers (tiny configs, the CLI) are in helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import tiny_config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Without a GPU, Triton kernels run in its interpreter; the switch is read when @triton.jit runs.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A directory of varied text documents, including multi-byte UTF-8."""
    root = tmp_path_factory.mktemp("corpus")
    lines = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
             "naïve café — ünïcödé ✓ 日本語", "The slings and arrows of outrageous fortune,"]
    for i in range(12):
        body = "\n".join(f"{lines[(i + j) % len(lines)]} [{i}.{j}]" for j in range(40 + 7 * i))
        (root / f"doc_{i:02d}.txt").write_text(body + "\n", encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "nested.txt").write_text("nested document\n" * 30)
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, text_corpus) -> Path:
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(str(text_corpus), out, val_fraction=0.25, shard_mb=0.004, log=lambda *_: None)
    return out


@pytest.fixture
def session(dataset, tmp_path):
    """A tiny config with process groups and megatron's parallel state set up (one process)."""
    from pretrain.core import parallel

    cfg = tiny_config(dataset, tmp_path / "run")
    parallel.setup(cfg)
    yield cfg
    parallel.teardown()


def pytest_collection_modifyitems(items):
    """Slurm tests submit jobs: they are integration tests too (`-m "not integration"` skips them)."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.integration)
