"""Resuming a checkpoint under another layout (pretrain/core/reshard.py): TP, PP, data-parallel
size and ZeRO stage change at load time, weights and optimizer state carried exactly. The
integration tests resume checkpoints written by 2 gloo ranks under torchrun."""
import math

import pytest
import torch

from helpers import build_model, run_cli, tiny_config, torchrun, train_cmd

TAG = "step_00000003"
# 6 steps, a checkpoint after step 3; no matmul probe (it only sets the MFU denominator)
RUN = {"train.steps": 6, "train.checkpoint_every": 3, "train.keep_last": 0, "train.peak_tflops": 1.0}
# The ZeRO tests' model: 5 norms of 66 elements do not split evenly into DeepSpeed's aligned
# partitions over 2 ranks, so the last rank's partition is padded (and saved without its padding).
UNEVEN = {"model.hidden_size": 66, "model.num_attention_heads": 3, "model.num_query_groups": 3}


def records(run_dir) -> list[dict]:
    from pretrain.core.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]


def source_run(dataset, run_dir, env_extra=None, **layout):
    """A 2-rank run of 6 steps that checkpoints after step 3 and keeps going: the unchanged
    layout's continuation is its own steps 4-6."""
    result = torchrun(2, train_cmd(dataset, run_dir, **RUN, **layout), env_extra=env_extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return run_dir


def resume(dataset, source, run_dir, nproc=1, **layout):
    args = train_cmd(dataset, run_dir, **RUN, **layout) + ["--resume", str(source / "checkpoints" / TAG)]
    result = torchrun(nproc, args) if nproc > 1 else run_cli(*args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


def test_tp_split_inverts_the_merge_and_saved_ranks_follow_megatrons_order():
    from megatron.core.parallel_state import RankGenerator

    from pretrain.core.model_dir import merge_tensor_parallel, split_tensor_parallel
    from pretrain.core.reshard import Sharding

    full = {name: torch.arange(48.0).view(8, 6) for name in (
        "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.mlp.linear_fc2.weight", "decoder.final_layernorm.weight")}
    for tp in (1, 2):
        shards = [{k: split_tensor_parallel(k, v, tp, r) for k, v in full.items()} for r in range(tp)]
        merged = merge_tensor_parallel(shards)
        assert all(torch.equal(merged[k], v) for k, v in full.items())
    fc1 = shards[1]["decoder.layers.0.mlp.linear_fc1.weight"]  # [gate; up] halves, each TP-split
    assert torch.equal(fc1, torch.cat([full["decoder.layers.0.mlp.linear_fc1.weight"][2:4],
                                       full["decoder.layers.0.mlp.linear_fc1.weight"][6:8]]))
    for tp, dp, pp in [(2, 2, 2), (2, 3, 1), (1, 2, 3)]:
        ranks = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        groups = {kind: ranks.get_ranks(kind) for kind in ("tp", "dp", "pp")}
        sharding = Sharding(tp, pp, dp, 1, "fp32")
        for r in range(tp * dp * pp):
            t, d, p = (next(g.index(r) for g in groups[kind] if r in g) for kind in ("tp", "dp", "pp"))
            assert sharding.rank(d, p, t) == r


@pytest.fixture(scope="module")
def zero1_dp2(dataset, tmp_path_factory):
    return source_run(dataset, tmp_path_factory.mktemp("zero1_dp2"), **UNEVEN)


@pytest.mark.integration
@pytest.mark.parametrize("split, settings", [
    ("parallel.tp", {}),
    ("parallel.pp", {"optim.qcontrol.enabled": True, "optim.qcontrol.every": 2}),
], ids=["tp2-to-tp1", "pp2-to-pp1"])
def test_model_parallel_checkpoint_continues_at_one_rank_as_unchanged(dataset, tmp_path, split, settings):
    """TP=2 (one update skipped for a NaN loss, so the skip counters are state too) and PP=2
    (with the Q-learning controller deciding every 2 steps, so its state is too) checkpoints,
    resumed by one process: the same per-step losses as the 2-rank run's own continuation (the
    data order depends on the data-parallel size only, 1 in both)."""
    from pretrain.core.trainer import NAN_AT_STEPS_ENV

    nan = {NAN_AT_STEPS_ENV: "2"} if split == "parallel.tp" else None
    source = source_run(dataset, tmp_path / "source", env_extra=nan, **{split: 2}, **settings)
    out = resume(dataset, source, tmp_path / "resumed", **{split: 1}, **settings)
    kind = "tp=2 pp=1" if split == "parallel.tp" else "tp=1 pp=2"
    assert f"resharding checkpoint {TAG} from [{kind} dp=1 zero=1 fp32] to [tp=1 pp=1 dp=1 zero=1 fp32]" in out
    unchanged, resumed = records(source), records(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for before, after in zip(unchanged[3:], resumed):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5), after["step"]
        assert after["skipped_steps"] == before["skipped_steps"] == (1 if nan else 0)
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-6) and after["tokens"] == before["tokens"]


@pytest.mark.integration
def test_zero1_dp2_checkpoint_trains_on_at_dp1_with_grad_accumulation(dataset, tmp_path, zero1_dp2):
    """DP=2 x 1 micro-batch -> DP=1 x grad accumulation 2: the same global batch, so the same
    tokens per step. The data loader re-splits its position (other batches than DP=2 would have
    made), so the losses are only near the unchanged run's; exactness of the state is checked
    without the loader below."""
    out = resume(dataset, zero1_dp2, tmp_path / "resumed", **UNEVEN, **{"train.grad_accum": 2})
    assert "from [tp=1 pp=1 dp=2 zero=1 fp32] to [tp=1 pp=1 dp=1 zero=1 fp32]" in out
    assert "data loader resharded (world_size 2 -> 1)" in out
    unchanged, resumed = records(zero1_dp2), records(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in unchanged[3:]]
    first = unchanged[0]["loss"]  # a fresh model's loss: the resumed one starts well below it
    for before, after in zip(unchanged[3:], resumed):
        assert math.isfinite(after["loss"]) and after["loss"] < first - 0.3
        assert after["loss"] == pytest.approx(before["loss"], abs=0.2)


@pytest.mark.integration
def test_zero1_checkpoint_continues_under_zero3_as_unchanged(dataset, tmp_path, zero1_dp2):
    """ZeRO-1 -> ZeRO-3 on the same 2 data-parallel ranks: every parameter is now cut in two
    across the ranks, its moments with it; same data, so the same losses."""
    out = resume(dataset, zero1_dp2, tmp_path / "resumed", nproc=2, **UNEVEN, **{"parallel.zero_stage": 3})
    assert "from [tp=1 pp=1 dp=2 zero=1 fp32] to [tp=1 pp=1 dp=2 zero=3 fp32]" in out
    unchanged, resumed = records(zero1_dp2), records(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for before, after in zip(unchanged[3:], resumed):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5), after["step"]


@pytest.mark.integration
def test_every_zero_stage_at_dp1_holds_the_saved_state_exactly(dataset, tmp_path, zero1_dp2):
    """The ZeRO-1 DP=2 checkpoint loaded into one process under ZeRO 0-3 (and bf16): the masters,
    Adam's moments and steps it then saves are the saved ones, bit for bit, and the module's
    weights are those that export consolidates (same loss on a batch)."""
    from pretrain.core import checkpoint, parallel, reshard
    from pretrain.core.config import load_config
    from pretrain.core.engine import build_engine
    from pretrain.core.model_dir import load_model

    ckpt = zero1_dp2 / "checkpoints"
    saved_cfg = load_config(ckpt / TAG / "config.yaml")
    batch = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))
    try:
        _, exported = load_model(str(ckpt / TAG))
        with torch.no_grad():
            expected_loss = exported(batch[:, :-1], batch[:, 1:]).mean()
    finally:
        parallel.teardown()
    for stage, dtype in [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")]:
        cfg = tiny_config(dataset, tmp_path / "run", **UNEVEN,
                          **{"parallel.zero_stage": stage, "parallel.dtype": dtype})
        layout = parallel.setup(cfg)
        try:
            engine = build_engine(cfg, build_model(cfg, seed=7), layout)
            saved = reshard.read_full_state(ckpt / TAG, reshard.saved_sharding(ckpt, TAG, saved_cfg),
                                            saved_cfg, engine.module, layout)
            resumed = reshard.load(engine, ckpt, TAG, cfg, layout)
            assert resumed.resharded and resumed.client["step"] == 3
            assert engine.lr_scheduler.last_epoch == 3
            with torch.no_grad():
                loss = engine(batch[:, :-1], batch[:, 1:]).float().mean()
            tolerance = 0 if dtype == "fp32" else 0.05  # bf16 weights are the masters rounded
            assert float(loss) == pytest.approx(float(expected_loss), abs=tolerance), (stage, dtype)
            out = tmp_path / f"zero{stage}_{dtype}"
            checkpoint.save(engine, out, 3, {"step": 3}, resumed.extra, cfg, keep_last=0)
            again = reshard.read_full_state(out / TAG, reshard.saved_sharding(out, TAG, cfg), cfg,
                                            engine.module, layout)
            assert sorted(again) == sorted(saved) and len(saved) > 0
            for name, entry in saved.items():
                assert sorted(again[name]) == ["exp_avg", "exp_avg_sq", "param", "step"], name
                for key, value in entry.items():
                    assert torch.equal(again[name][key], value), (stage, dtype, name, key)
        finally:
            parallel.teardown()
