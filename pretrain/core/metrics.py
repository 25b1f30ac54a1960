"""Run-directory logging on rank 0: metrics.jsonl (the contract other tools read), wandb
(offline unless WANDB_MODE says otherwise, files kept in the run dir) and a tqdm progress bar."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from pretrain.core.config import RunConfig

METRICS = "metrics.jsonl"


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records newer than the checkpoint so the log reads as one unbroken run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RunLogger:
    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = run_dir / METRICS
        self._file = None
        self._wandb = None
        self.bar = None
        if not enabled:
            return
        if start_step > 0:
            truncate_after(self.path, start_step)
        elif self.path.is_file():  # a fresh start: an interrupted attempt's records would repeat
            self.path.unlink()
        self._file = open(self.path, "a", buffering=1)
        self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not cfg.log.progress, desc="train")
        if cfg.log.wandb:
            self._wandb = self._init_wandb(cfg, run_dir)

    @staticmethod
    def _init_wandb(cfg: RunConfig, run_dir: Path):
        # Only the env var guarantees zero network connections (FINDINGS.md).
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        # Everything wandb writes stays in this run's directory (wandb adds "wandb/" itself).
        state = run_dir / "wandb" / ".state"
        state.mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(run_dir)
        for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ[var] = str(state)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        import wandb

        return wandb.init(project=cfg.log.wandb_project, name=run_dir.name, id=run_id,
                          resume="allow", dir=str(run_dir), config=cfg.to_dict())

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            prefix = f"{record['split']}/" if "split" in record else "train/"
            self._wandb.log({prefix + k: v for k, v in record.items()
                             if k not in ("step", "split") and isinstance(v, (int, float))},
                            step=record["step"])

    def advance(self, steps: int, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def print(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
