"""bench train: our trainer against transformers' Mistral in one process, and what it builds on
(the phase ranges the trainer marks, train.compile)."""
import json

import pytest
import torch
import torch.distributed as dist
from torch.profiler import profile, record_function

from helpers import losses_by_step, run_cli, tiny_overrides, train_cmd


@pytest.mark.integration
def test_bench_train_reports_both_sides_mfu_and_where_the_step_goes(dataset, tmp_path):
    out = tmp_path / "bench"
    sets = tiny_overrides(dataset, tmp_path / "unused", **{"model.sliding_window": 0})
    result = run_cli("-m", "pretrain", "bench", "train", "--config", "configs/mistral_tiny.yaml",
                     *[a for s in sets for a in ("--set", s)], "--out", str(out),
                     "--warmup", "1", "--steps", "3", "--profile-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["tokens_per_step"] == 4 * 64
    assert len(r["ours"]["step_times_s"]) == len(r["hf"]["step_times_s"]) == 3
    assert len(r["plain"]["step_times_s"]) == 3  # the plain PyTorch loop over our model
    assert r["vs_plain"] == pytest.approx(r["ours_tokens_per_s"] / r["plain_tokens_per_s"])
    for side in ("ours", "hf", "plain"):
        times = r[side]["step_times_s"]
        assert min(times) <= r[side]["step_p25_s"] <= r[side]["step_s"] <= max(times), side
    assert r["ratio_p25"] == pytest.approx(r["hf"]["step_p25_s"] / r["ours"]["step_p25_s"])
    assert r["ours_tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["ours"]["step_s"])
    assert r["hf_tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["hf"]["step_s"])
    assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["hf_tokens_per_s"])
    assert r["mfu"] == pytest.approx(r["ours_tokens_per_s"] * r["flops_per_token"] / 1e12
                                     / r["peak_tflops"])
    assert 0 < r["mfu"] < 1.5 and r["peak_source"].startswith("fp32")
    phases = r["ours"]["phases"]
    for name in ("data", "forward", "backward", "optimizer", "logging"):
        assert phases["seconds_per_step"][name] > 0, name
    assert sum(phases["fraction"].values()) == pytest.approx(1.0, abs=0.02)
    assert "ours / transformers" in (out / "table.md").read_text()
    assert "aten::mm" in (out / "profile_ours.txt").read_text()


@pytest.mark.integration
def test_bench_train_refuses_a_model_transformers_does_not_have(dataset, tmp_path):
    result = run_cli("-m", "pretrain", "bench", "train", "--config", "configs/fim_mistral_tiny.yaml",
                     "--set", f"data.path={dataset}", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "use a mistral config" in result.stderr


def test_phase_breakdown_moves_collectives_to_communication(session):
    from pretrain.bench.train import phase_breakdown

    a = torch.randn(256, 256)
    with profile() as prof:
        with record_function("phase/forward"):
            for _ in range(20):
                a = torch.tanh(a @ a)
            t = torch.ones(1 << 16)
            dist.all_reduce(t)
        with record_function("phase/logging"):
            dist.all_reduce(t)
    events = prof.events()
    comm = sum(e.time_range.elapsed_us() for e in events if e.name == "c10d::allreduce_") / 1e6
    forward = sum(e.time_range.elapsed_us() for e in events if e.name == "phase/forward") / 1e6
    step = forward * 3
    b = phase_breakdown(events, [step])
    s = b["seconds_per_step"]
    assert comm > 0 and s["communication"] == pytest.approx(comm, rel=1e-6)
    assert s["forward"] < forward and s["forward"] + s["logging"] + s["communication"] > forward
    assert sum(b["fraction"].values()) == pytest.approx(1.0)
    assert s["other"] == pytest.approx(step - sum(v for k, v in s.items() if k != "other"))


@pytest.mark.integration
def test_compiled_training_matches_eager_and_shares_its_checkpoints(dataset, tmp_path):
    def train(run_dir, **extra):
        done = run_cli(*train_cmd(dataset, run_dir,
                                  **{"train.steps": 4, "parallel.zero_stage": 0, **extra}))
        assert done.returncode == 0, done.stderr[-3000:]
        return losses_by_step(run_dir)

    eager = train(tmp_path / "eager")
    compiled = train(tmp_path / "compiled", **{"train.compile": True})
    assert sorted(compiled) == [1, 2, 3, 4]
    for step in eager:  # fused kernels round differently: close, not bit-equal
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), step
    # parameter names are eager's, so an eager run resumes from a compiled run's checkpoint
    resumed = train(tmp_path / "compiled", **{"train.steps": 6})
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
