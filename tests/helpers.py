"""What several test files use: the repository root, tiny run configs that train in seconds on a
CPU, and running the command line (in-process fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A ~0.1M-parameter model on 64-byte sequences: a step takes milliseconds."""
    values = {
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.num_query_groups": 2, "model.ffn_hidden_size": 128, "model.seq_length": 64,
        "model.sliding_window": 32, "data.path": str(data_dir), "train.run_dir": str(run_dir),
        # the configs read shuffled windows; these runs reshard and change layouts, which needs stream order
        "data.window_order": "stream",
        # the tiny config's lr is tuned for its 3.2M-parameter shape; this 0.1M model learns in a few steps at 3e-3
        "optim.lr": 3e-3, "optim.min_lr": 3e-4,
        "train.micro_batch_size": 4, "train.steps": 6, "train.eval_every": 0,
        "train.checkpoint_every": 0, "train.eval_batches": 2, "train.log_every": 1,
        "optim.warmup_steps": 2, "log.wandb": False, "log.progress": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_dir: Path, run_dir: Path, **extra):
    from pretrain.core.config import load_config

    return load_config(ROOT / "configs" / "mistral_tiny.yaml", tiny_overrides(data_dir, run_dir, **extra))


def train_cmd(dataset, run_dir, **extra) -> list[str]:
    """`python -m pretrain train` arguments (after the interpreter) for the tiny config."""
    args = ["-m", "pretrain", "train", "--config", str(ROOT / "configs" / "mistral_tiny.yaml")]
    for item in tiny_overrides(dataset, run_dir, **extra):
        args += ["--set", item]
    return args


def losses_by_step(run_dir: Path) -> dict[int, float]:
    from pretrain.core.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


def run_cli(*args: str, timeout: float = 600, env_extra: dict | None = None,
            **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def torchrun(nproc: int, args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args,
                   env_extra=env_extra)


def build_model(cfg, seed: int = 0):
    """The configured model family, vocabulary resolved for the byte tokenizer, seeded init."""
    import torch

    from model import get_family
    from pretrain.core.trainer import resolve_vocab

    resolve_vocab(cfg, 258)
    torch.manual_seed(seed)
    return get_family(cfg.model.name).build(cfg.model, cfg.parallel)
