"""Two gloo ranks through the real launcher: torchrun -m pretrain train."""
import pytest

from conftest import run_cli
from test_train import losses_by_step, train_cmd


def torchrun(nproc: int, args: list[str]):
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args)


@pytest.fixture(scope="module")
def single_process_losses(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = run_cli(*train_cmd(dataset, run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return losses_by_step(run_dir)


@pytest.mark.parametrize("layout", [
    {"parallel.tp": 1, "train.micro_batch_size": 2},   # data parallel: same global batch of 4
    {"parallel.tp": 2, "train.micro_batch_size": 4},   # tensor parallel: megatron's TP layers
])
def test_two_ranks_match_one_process(dataset, tmp_path, single_process_losses, layout):
    run_dir = tmp_path / "run"
    result = torchrun(2, train_cmd(dataset, run_dir, **layout))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    losses = losses_by_step(run_dir)
    assert sorted(losses) == sorted(single_process_losses)
    for step, loss in single_process_losses.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
