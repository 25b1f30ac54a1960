import json
import signal
import time

import pytest
import torch

from pretrain.core import checkpoint, parallel
from pretrain.core.engine import build_engine
from pretrain.core.metrics import read_metrics
from pretrain.core.trainer import EXIT_STOPPED

from helpers import ROOT, build_model, losses_by_step, run_cli, tiny_config, train_cmd


def build(cfg, seed):
    return build_engine(cfg, build_model(cfg, seed), parallel.setup(cfg))


def fixed_batch(seq=64, batch=4):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def step(engine, inputs, labels) -> float:
    loss = engine(inputs, labels).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_steps_on_a_fixed_batch_lower_the_loss(session, zero_stage):
    session.parallel.zero_stage = zero_stage
    session.optim.warmup_steps = 0
    engine = build(session, seed=0)
    inputs, labels = fixed_batch()
    losses = [step(engine, inputs, labels) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_restores_parameters_and_optimizer_state(session, tmp_path):
    inputs, labels = fixed_batch()
    engine = build(session, seed=0)
    for _ in range(3):
        step(engine, inputs, labels)
    ckpt = tmp_path / "ckpt"
    extra = {"data": {"anything": 1}, "rng": checkpoint.rng_state()}
    checkpoint.save(engine, ckpt, 3, {"step": 3}, extra, session, keep_last=2)
    assert (ckpt / "latest").read_text() == "step_00000003"

    other = build(session, seed=99)  # different init: loading must overwrite everything
    assert not all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), other.module.parameters()))
    client, loaded_extra = checkpoint.load(other, ckpt, "step_00000003",
                                           checkpoint.layout_of(session, 1))
    assert client["step"] == 3 and loaded_extra["data"] == {"anything": 1}
    for a, b in zip(engine.module.parameters(), other.module.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = engine.optimizer.state_dict(), other.optimizer.state_dict()
    flat_a = [t for t in _tensors(state_a)]
    flat_b = [t for t in _tensors(state_b)]
    assert len(flat_a) == len(flat_b) > 0
    assert all(torch.equal(a, b) for a, b in zip(flat_a, flat_b))
    assert other.lr_scheduler.state_dict() == engine.lr_scheduler.state_dict()
    # Continuing from either gives the same next update.
    assert step(engine, inputs, labels) == step(other, inputs, labels)
    session.parallel.zero_stage = 0  # another layout: refused, naming both
    with pytest.raises(checkpoint.CheckpointError, match=r"zero_stage=1\].*zero_stage=0\]"):
        checkpoint.load(other, ckpt, "step_00000003", checkpoint.layout_of(session, 1))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def test_retention_keeps_last_n_and_removes_incomplete(session, tmp_path):
    engine = build(session, seed=0)
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_00000009").mkdir(parents=True)  # debris of a crash mid-write
    extra = {"data": {}, "rng": checkpoint.rng_state()}
    for s in (1, 2, 3):
        checkpoint.save(engine, ckpt, s, {"step": s}, extra, session, keep_last=2)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert checkpoint.latest_tag(ckpt) == "step_00000003"


SIGNAL_TEST_STEPS = 400


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> dict[int, float]:
    reference = tmp_path_factory.mktemp("reference")
    done = run_cli(*train_cmd(dataset, reference, **{"train.steps": SIGNAL_TEST_STEPS}))
    assert done.returncode == 0, done.stderr[-2000:]
    return losses_by_step(reference)


def test_every_stop_signal_is_caught_and_a_second_ctrl_c_aborts():
    """SIGINT, SIGTERM and SIGUSR1 share one handler; the run below stops by SIGTERM (what Slurm
    and schedulers send), the Slurm tests by SIGUSR1."""
    import os

    from pretrain.core.trainer import StopSignal

    before = signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        stop = StopSignal()
        try:
            assert not stop.requested(world_size=1)
            os.kill(os.getpid(), sig)
            assert stop.requested(world_size=1) and stop.signum == sig
            if sig == signal.SIGINT:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
        finally:
            stop.restore()
    assert signal.getsignal(signal.SIGINT) is before  # restore() puts back what was there


@pytest.mark.integration
def test_signal_checkpoints_and_rerun_resumes_exactly(dataset, tmp_path, uninterrupted):
    import subprocess
    import sys

    steps = SIGNAL_TEST_STEPS
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, *train_cmd(dataset, run_dir, **{"train.steps": steps})],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(losses_by_step(run_dir)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, out[-2000:]
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 5 <= stopped_at < steps

    again = run_cli(*train_cmd(dataset, run_dir, **{"train.steps": steps}))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {stopped_at}" in again.stdout + again.stderr
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))  # the step counter continued
    assert resumed == uninterrupted  # data order, RNG, optimizer and LR schedule all restored


@pytest.mark.integration
def test_wandb_logs_offline_inside_the_run_dir(dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*train_cmd(dataset, run_dir, **{"log.wandb": True, "train.steps": 2}),
                     env_extra={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    record = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r][-1]
    for key in ("step", "loss", "lr", "tokens", "bytes", "tokens_per_s", "elapsed_s"):
        assert key in record  # the metrics.jsonl contract (DESIGN.md)
    assert record["tflops_per_device"] > 0 and 0 < record["mfu"] < 1.5 and record["peak_mem_mb"] > 100
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert (run_dir / "wandb_id").read_text() in runs[0].name


def damage_every_train_shard(dataset, tmp_path):
    import shutil

    from data_pipeline.shards import read_manifest

    copy = tmp_path / "damaged"
    shutil.copytree(dataset, copy)
    names = [s["name"] for s in read_manifest(copy)["splits"]["train"]["shards"]]
    victim = copy / names[0]
    victim.write_bytes(victim.read_bytes()[:700])
    return copy, victim.name


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_training_names_a_corrupt_shard_or_skips_and_counts_it(dataset, tmp_path, workers):
    copy, victim = damage_every_train_shard(dataset, tmp_path)
    extra = {"train.steps": 400, "train.log_every": 50, "data.num_workers": workers}
    failed = run_cli(*train_cmd(copy, tmp_path / "strict", **extra))
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert victim in failed.stderr and "Traceback" not in failed.stderr
    skipped = run_cli(*train_cmd(copy, tmp_path / "skip", **extra, **{"data.on_error": "skip"}))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    records = [r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if "split" not in r]
    assert records[-1]["data_skipped_shards"] >= 1


@pytest.mark.integration
def test_wrong_tokenizer_is_refused(dataset, tmp_path):
    result = run_cli(*train_cmd(dataset, tmp_path / "run", **{"data.tokenizer": "sentencepiece"}))
    assert result.returncode == 2
    assert "data.tokenizer=sentencepiece" in result.stderr and "bytes" in result.stderr


@pytest.mark.integration
def test_sigkill_mid_checkpoint_keeps_latest_on_the_previous_one(dataset, tmp_path):
    from pretrain.core.checkpoint import KILL_MID_CHECKPOINT_ENV

    extra = {"train.steps": 9, "train.checkpoint_every": 3}
    reference = tmp_path / "reference"
    assert run_cli(*train_cmd(dataset, reference, **extra)).returncode == 0
    run_dir = tmp_path / "killed"
    killed = run_cli(*train_cmd(dataset, run_dir, **extra), env_extra={KILL_MID_CHECKPOINT_ENV: "6"})
    assert killed.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()
    resumed = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 3" in resumed.stdout + resumed.stderr
    assert losses_by_step(run_dir) == losses_by_step(reference)
    assert not (ckpts / "step_00000006").exists() or (ckpts / "step_00000006" / "COMPLETE").exists()


@pytest.mark.integration
def test_resumed_run_logs_the_same_records_when_checkpoints_fall_between_log_lines(dataset, tmp_path):
    """log_every 5, checkpoint_every 3, killed while writing step 12's checkpoint: resumed from
    step 9, the steps 6-9 not yet logged travel in the checkpoint, so the step-10 record (mean
    loss, tokens, cumulative bytes) is the uninterrupted run's."""
    from pretrain.core.checkpoint import KILL_MID_CHECKPOINT_ENV

    extra = {"train.steps": 15, "train.checkpoint_every": 3, "train.log_every": 5}
    fields = ("loss", "tokens", "bytes", "lr", "skipped_steps")

    def records(run_dir):
        return {r["step"]: {k: r[k] for k in fields} for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}
    reference = tmp_path / "reference"
    assert run_cli(*train_cmd(dataset, reference, **extra)).returncode == 0
    run_dir = tmp_path / "killed"
    killed = run_cli(*train_cmd(dataset, run_dir, **extra), env_extra={KILL_MID_CHECKPOINT_ENV: "12"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert resumed.returncode == 0 and "at step 9" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    assert sorted(records(run_dir)) == [5, 10, 15]
    assert records(run_dir) == records(reference)


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 1])  # ZeRO-2 checks overflow in ZeRO-1's optimizer class
def test_nonfinite_updates_are_skipped_counted_and_abort_when_persistent(dataset, tmp_path, zero_stage):
    from pretrain.core.trainer import EXIT_DIVERGED, NAN_AT_STEPS_ENV

    extra = {"train.steps": 8, "parallel.zero_stage": zero_stage, "train.max_skipped_steps": 2}
    clean = tmp_path / "clean"
    assert run_cli(*train_cmd(dataset, clean, **extra)).returncode == 0
    run_dir = tmp_path / "nan"
    result = run_cli(*train_cmd(dataset, run_dir, **extra), env_extra={NAN_AT_STEPS_ENV: "3,4"})
    assert result.returncode == 0, result.stderr[-2000:]
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}
    assert records[3]["loss"] is None and records[4]["loss"] is None  # not averaged in as NaN
    assert records[2]["skipped_steps"] == 0 and records[8]["skipped_steps"] == 2
    reference = losses_by_step(clean)
    assert records[3]["lr"] == records[4]["lr"]  # the schedule does not advance on a skipped update
    assert records[2]["loss"] == reference[2]
    assert all(r["loss"] is not None and r["loss"] < 10 for s, r in records.items() if s > 4)
    diverged = run_cli(*train_cmd(dataset, tmp_path / "diverged", **extra),
                       env_extra={NAN_AT_STEPS_ENV: "3,4,5,6"})
    assert diverged.returncode == EXIT_DIVERGED
    assert "3 updates in a row" in diverged.stderr and "train.max_skipped_steps=2" in diverged.stderr
    assert "Traceback" not in diverged.stderr


@pytest.mark.integration
def test_skipped_step_count_survives_resume(dataset, tmp_path):
    import shutil

    from pretrain.core.trainer import NAN_AT_STEPS_ENV

    extra = {"train.steps": 8, "train.checkpoint_every": 4, "train.keep_last": 0}
    run_dir = tmp_path / "run"
    nan = {NAN_AT_STEPS_ENV: "3"}
    assert run_cli(*train_cmd(dataset, run_dir, **extra), env_extra=nan).returncode == 0
    uninterrupted = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_00000008")
    (ckpts / "latest").write_text("step_00000004")  # as if stopped after step 4
    assert run_cli(*train_cmd(dataset, run_dir, **extra), env_extra=nan).returncode == 0
    resumed = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    assert [r["skipped_steps"] for r in resumed] == [r["skipped_steps"] for r in uninterrupted]
    assert resumed[-1]["skipped_steps"] == 1


@pytest.mark.parametrize("zero_stage, dtype, grad_clip, deepspeed_clip, ours", [
    (1, "fp32", 1.0, 1.0, None), (1, "fp32", 0.0, 0.0, None),   # 0 disables (DeepSpeed's default is 1)
    (0, "fp32", 0.5, 0.0, 0.5), (0, "bf16", 0.5, 0.5, 0.0)])
def test_gradient_clipping_is_done_once_and_zero_disables_it(dataset, tmp_path, zero_stage, dtype,
                                                             grad_clip, deepspeed_clip, ours):
    from pretrain.core.engine import SkippingAdamW, build_optimizer, deepspeed_config
    from pretrain.core.parallel import Layout

    cfg = load_config_tiny(dataset, tmp_path, zero_stage, dtype, grad_clip)
    layout = Layout(0, 1, 0, 1, 1, 1, 0, 0, 0, torch.device("cpu"))
    assert deepspeed_config(cfg, layout)["gradient_clipping"] == deepspeed_clip
    optimizer = build_optimizer(cfg, torch.nn.Linear(4, 4))
    assert isinstance(optimizer, SkippingAdamW) == (zero_stage == 0)
    if ours is not None:
        assert optimizer.max_grad_norm == ours


def load_config_tiny(dataset, tmp_path, zero_stage, dtype, grad_clip):
    from helpers import tiny_config

    return tiny_config(dataset, tmp_path / "run", **{"parallel.zero_stage": zero_stage,
                                                      "parallel.dtype": dtype,
                                                      "optim.grad_clip": grad_clip})


def test_zero0_clips_by_the_global_norm_and_reports_it(session):
    from pretrain.core.engine import SkippingAdamW

    weights = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    weights[0].grad, weights[1].grad = torch.full((3,), 2.0), torch.full((4,), 1.0)
    optimizer = SkippingAdamW(weights, max_grad_norm=1.0, lr=0.0)
    optimizer.step()
    assert float(optimizer._global_grad_norm) == pytest.approx(4.0)  # sqrt(3*4 + 4*1)
    clipped = torch.cat([w.grad for w in weights]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-5) and not optimizer.overflow
    weights[1].grad[0] = float("nan")
    optimizer.step()
    assert optimizer.overflow


def test_a_fresh_start_does_not_repeat_an_interrupted_attempts_records(dataset, tmp_path):
    """A run restarted from step 0 (no checkpoint yet) starts a new log; a resume keeps the
    records up to its checkpoint."""
    from pretrain.core.metrics import RunLogger

    cfg = tiny_config(dataset, tmp_path)
    log = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5))
    log.write_text(old)
    RunLogger(cfg, tmp_path, enabled=True, start_step=3).close()
    assert [r["step"] for r in read_metrics(log)] == [0, 1, 2, 3]
    log.write_text(old)
    RunLogger(cfg, tmp_path, enabled=True, start_step=0).close()
    assert read_metrics(log) == []
