"""Two gloo ranks through the real launcher: torchrun -m pretrain train."""
import pytest
import torch

from pretrain.core.metrics import read_metrics

from helpers import losses_by_step, run_cli, torchrun, train_cmd

pytestmark = pytest.mark.integration   # every test here starts other processes


@pytest.fixture(scope="module")
def single_process_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = run_cli(*train_cmd(dataset, run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl")
            if "grad_norm" in r}


@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.pp": 2},
                                    {"parallel.pp": 2, "parallel.zero_stage": 0}],
                         ids=["tp2", "pp2", "pp2-zero0"])
def test_model_parallel_matches_one_process(dataset, tmp_path, single_process_run, layout):
    """TP=2 splits every layer over two ranks; PP=2 puts one layer on each rank, driven by
    megatron's pipeline schedule. The model, its initial weights and its data are those of one
    process: same per-step losses, and the exported weights agree after training."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    result = torchrun(2, train_cmd(dataset, run_dir, **layout))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    expected, losses = losses_by_step(single_process_run), losses_by_step(run_dir)
    assert sorted(losses) == sorted(expected)
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
    # the clipping norm covers every parameter once: sharded ones on all ranks, replicated ones once
    expected_norms, norms = grad_norms(single_process_run), grad_norms(run_dir)
    assert sorted(norms) == sorted(expected_norms)
    for step, norm in expected_norms.items():
        assert norms[step] == pytest.approx(norm, rel=1e-5), step
    weights = []
    for src in (single_process_run, run_dir):
        out = tmp_path / f"export_{src.name}"
        done = run_cli("-m", "pretrain", "export", "--ckpt", str(src), "--out", str(out))
        assert done.returncode == 0, done.stderr[-2000:]
        weights.append(load_file(str(out / "model.safetensors")))
    assert sorted(weights[0]) == sorted(weights[1])
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-4, rtol=0, msg=name)


def test_data_parallel_ranks_train_on_disjoint_data(dataset, tmp_path):
    """DP=2: each rank streams its own shards (the data order depends on the DP size, so losses
    are not those of one process); tokens per step double and the averaged loss falls."""
    run_dir = tmp_path / "run"
    result = torchrun(2, train_cmd(dataset, run_dir, **{"train.steps": 30, "data.num_workers": 1}))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    assert records[0]["tokens"] == 2 * 4 * 64  # 2 ranks x micro-batch 4 x 64 tokens
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    ckpt = run_dir / "checkpoints" / "step_00000030"
    states = [torch.load(ckpt / f"extra_rank{r:05d}.pt", weights_only=False)["data"] for r in (0, 1)]
    positions = [(st["slots"][0]["pending"], st["slots"][0]["offset"]) for st in states]
    assert positions[0] != positions[1]  # each rank reads its own shards


@pytest.mark.parametrize("stage, pp", [(1, 1), (2, 1), (3, 1), (1, 2)],
                         ids=["zero1", "zero2", "zero3", "zero1-pp2"])
def test_zero_stage_resume_with_two_ranks_is_exact(dataset, tmp_path, stage, pp):
    """10 uninterrupted steps vs. stopping after step 5 (its checkpoint is then `latest`) and
    resuming: steps 6-10 give the same losses, data order included (each rank has a worker)."""
    import shutil

    extra = {"parallel.zero_stage": stage, "parallel.pp": pp, "train.steps": 10,
             "train.checkpoint_every": 5, "train.keep_last": 0, "data.num_workers": 1}
    run_dir = tmp_path / "run"
    full = torchrun(2, train_cmd(dataset, run_dir, **extra))
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    uninterrupted = losses_by_step(run_dir)
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_00000010")
    (ckpts / "latest").write_text("step_00000005")
    again = torchrun(2, train_cmd(dataset, run_dir, **extra))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "at step 5" in again.stdout + again.stderr
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
