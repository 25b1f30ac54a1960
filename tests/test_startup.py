"""Start-up: the run says where the time to its first step went; the matmul probe is measured
once per machine; the step-0 evaluation can be skipped."""
import json
import re

import pytest
import torch

from pretrain.core.throughput import cached_probe_tflops, probe_cache_path

from helpers import run_cli, train_cmd


def test_matmul_probe_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE_DIR", str(tmp_path))
    first, cached = cached_probe_tflops(torch.device("cpu"), torch.float32)
    assert not cached and first > 0 and probe_cache_path().is_file()
    again, cached = cached_probe_tflops(torch.device("cpu"), torch.float32)
    assert cached and again >= first  # the best figure seen is kept
    stored = json.loads(probe_cache_path().read_text())
    assert max(e["tflops"] for e in stored.values()) == again
    other, cached = cached_probe_tflops(torch.device("cpu"), torch.bfloat16)  # another key
    assert not cached
    assert len(json.loads(probe_cache_path().read_text())) == 2


@pytest.mark.integration
def test_run_prints_its_start_up_and_can_skip_the_step0_evaluation(dataset, tmp_path):
    # a fresh probe cache only: XDG_CACHE_HOME would also move DeepSpeed's compiled ops (a ~40 s rebuild)
    env = {"PRETRAIN_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for name, at_start in (("first", "true"), ("second", "false")):
        result = run_cli(*train_cmd(dataset, tmp_path / name, **{"train.steps": 2, "train.eval_at_start": at_start}),
                         env_extra=env)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(result.stdout + result.stderr)
    for out in runs:
        line = re.search(r"start-up: ([\d.]+) s to the first step \((.*)\)", out)
        assert line, out[-2000:]
        assert line.group(2).startswith("imports ")
    assert "(matmul probe)" in runs[0] and "(matmul probe, best of the runs on this machine)" in runs[1]
    assert "step 0: val" in runs[0] and "step 0: val" not in runs[1]
    assert "step-0 eval" not in runs[1]
