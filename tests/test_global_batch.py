"""Resuming on another data-parallel size keeps the global batch or says what to set."""
import pytest

from pretrain.core.checkpoint import COMPLETE, CheckpointError
from pretrain.core.config import save_config
from pretrain.core.global_batch import keep_global_batch

from helpers import tiny_config


@pytest.fixture
def ckpt(dataset, tmp_path):
    """A checkpoint directory's config and COMPLETE marker: micro batch 4 x accum 1 on DP=2."""
    saved = tiny_config(dataset, tmp_path / "run", **{"train.micro_batch_size": 4, "train.grad_accum": 1})
    path = tmp_path / "step_00000004"
    path.mkdir()
    save_config(saved, path / "config.yaml")
    (path / COMPLETE).write_text("world_size=2 tp=1 pp=1 zero_stage=1\n")
    return path


def test_same_global_batch_resumes_as_is(dataset, tmp_path, ckpt):
    cfg = tiny_config(dataset, tmp_path / "run", **{"train.micro_batch_size": 2, "train.grad_accum": 2})
    assert keep_global_batch(cfg, ckpt, dp=2) is None and cfg.train.grad_accum == 2


def test_fewer_ranks_are_refused_with_the_values_and_the_fix(dataset, tmp_path, ckpt):
    cfg = tiny_config(dataset, tmp_path / "run", **{"train.micro_batch_size": 4})
    with pytest.raises(CheckpointError, match=r"4 x 1 x 2 = 8 sequences.*4 x 1 x 1 = 4: set "
                                              r"train\.grad_accum=2 \(or train\.keep_global_batch=true\)"):
        keep_global_batch(cfg, ckpt, dp=1)


def test_keep_global_batch_adjusts_grad_accum(dataset, tmp_path, ckpt):
    cfg = tiny_config(dataset, tmp_path / "run", **{"train.micro_batch_size": 4, "train.keep_global_batch": True})
    line = keep_global_batch(cfg, ckpt, dp=1)
    assert cfg.train.grad_accum == 2 and "train.grad_accum 1 -> 2" in line


def test_a_global_batch_no_accumulation_can_reach_is_refused(dataset, tmp_path, ckpt):
    cfg = tiny_config(dataset, tmp_path / "run", **{"train.micro_batch_size": 3, "train.keep_global_batch": True})
    with pytest.raises(CheckpointError, match="change train.micro_batch_size"):
        keep_global_batch(cfg, ckpt, dp=1)
