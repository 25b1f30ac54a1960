"""`pretrain tune`: the spec is validated against the run config, and a 4-trial PBT search over
the trainer on 2 CPUs completes, records exploit events and leaves a restorable experiment."""
import json

import pytest
import yaml

from pretrain.core.config import ConfigError

from helpers import ROOT, run_cli


def spec_file(tmp_path, dataset, **changes) -> str:
    spec = yaml.safe_load((ROOT / "configs" / "tune" / "pbt_tiny.yaml").read_text())
    spec["overrides"] += [f"data.path={dataset}", "model.seq_length=32"]
    spec.update(changes)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_the_spec_is_checked_against_the_run_config(tmp_path, dataset):
    from pretrain.research.tune_spec import load_spec

    bad_key = [{"key": "optim.learning_rate", "distribution": "uniform", "low": 0.1, "high": 0.2}]
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_spec(spec_file(tmp_path, dataset, search_space=bad_key))
    reversed_bounds = [{"key": "optim.lr", "distribution": "loguniform", "low": 0.1, "high": 0.01}]
    with pytest.raises(ConfigError, match="low < high"):
        load_spec(spec_file(tmp_path, dataset, search_space=reversed_bounds))
    with pytest.raises(ConfigError, match="unknown config key 'schedulr'"):
        load_spec(spec_file(tmp_path, dataset, schedulr={}))


def test_a_token_budget_gives_every_batch_shape_the_same_tokens(tmp_path, dataset):
    from pretrain.research.tune_spec import load_spec, trial_config

    spec = load_spec(spec_file(tmp_path, dataset, tokens=12_288, evaluations=3))
    base = trial_config(spec, {}, str(tmp_path / "run"))
    for rows, steps in ((4, 96), (8, 48), (16, 24)):
        cfg = trial_config(spec, {"train.micro_batch_size": rows}, str(tmp_path / "run"))
        assert (cfg.train.steps, cfg.train.eval_every) == (steps, steps // 3)
        assert cfg.train.steps * rows * cfg.model.seq_length == 12_288
        assert cfg.train.eval_batches * rows == base.train.eval_batches * base.train.micro_batch_size
    with pytest.raises(ConfigError, match="evaluations"):
        load_spec(spec_file(tmp_path, dataset, tokens=1000, evaluations=0))


@pytest.mark.integration
def test_a_pbt_search_completes_records_exploits_and_restores(tmp_path, dataset):
    out = tmp_path / "out"
    # the shipped config's 180 steps and 9 reports (trials overlap), half the population exploiting
    # (each exploit restarts a trial process: more decisions cost minutes)
    config = spec_file(tmp_path, dataset, scheduler={"name": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5})
    done = run_cli("-m", "pretrain", "tune", "--config", config, "--out", str(out), "--num-cpus", "2",
                   timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 4
    assert all(t["final_step"] == 180 and t["error"] is None for t in summary["trials"])
    assert sorted(t["trial"] for t in summary["trials"]) == sorted({t["trial"] for t in summary["trials"]})
    assert all((out / t["dir"] / "run" / "metrics.jsonl").is_file() for t in summary["trials"])
    assert summary["exploits"], "PBT never exploited"
    for event in summary["exploits"] + summary["restarts_from_other_trials"]:
        assert event["cloned_from"] != event["trial"] and set(event["config"]) == {"optim.lr", "optim.weight_decay"}
    best = summary["best"]
    assert best["bpb"] == min(t["final_bpb"] for t in summary["trials"])
    assert yaml.safe_load((out / "best_config.yaml").read_text())["optim"]["lr"] == pytest.approx(best["config"]["optim.lr"])
    report = (out / "summary.md").read_text()
    assert "## Exploit / explore history" in report and (out / "curves.png").stat().st_size > 0
    again = run_cli("-m", "pretrain", "tune", "--config", config, "--out", str(out), "--num-cpus", "2",
                    "--resume", timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert len(json.loads((out / "summary.json").read_text())["trials"]) == 4
    fresh = run_cli("-m", "pretrain", "tune", "--config", config, "--out", str(out), "--num-cpus", "2")
    assert fresh.returncode == 2 and "pass --resume" in fresh.stderr


def test_the_layout_policy_learns_the_rewarded_choice():
    """REINFORCE over per-layer categoricals: rewarding one block size in layer 0 and one top-k in
    layer 1 makes those the policy's most likely choices; the others stay near uniform."""
    from pretrain.research.layout_search import LayoutPolicy
    from pretrain.research.tune_spec import LayoutSearchSpec

    policy = LayoutPolicy(LayoutSearchSpec(enabled=True, learning_rate=0.3), num_layers=2, seed=0)
    for _ in range(300):
        indices = policy.sample()
        reward = float(indices[0]["block_size"] == 2) + float(indices[1]["top_k"] == 0)
        policy.update(indices, reward)
    best = policy.layout(policy.greedy())
    assert best[0]["block_size"] == 64 and best[1]["top_k"] == 0
    probs = policy._probs(policy.logits[0]["block_size"])
    assert probs[2] > 0.8


def test_the_layout_search_spec_is_checked(tmp_path, dataset):
    from pretrain.research.tune_spec import load_spec

    spec = yaml.safe_load((ROOT / "configs" / "tune" / "fim_layout_tiny.yaml").read_text())
    spec["layout_search"]["block_size"] = [8, 32]           # the base config's 16 is missing
    path = tmp_path / "layout.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="must contain the base config's value 16"):
        load_spec(path)
    spec = yaml.safe_load((ROOT / "configs" / "tune" / "fim_layout_tiny.yaml").read_text())
    spec["scheduler"] = {"name": "pbt"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="needs scheduler fifo or asha"):
        load_spec(path)


def test_pbt_explore_values_are_clipped_to_the_search_space():
    """Ray's PBT perturbs by x0.8 / x1.2 regardless of bounds: beta1 0.91 would become 1.09."""
    from pretrain.research.tune import ClipToSearchSpace
    from pretrain.research.tune_spec import SearchDim

    clip = ClipToSearchSpace([SearchDim("optim.beta1", "uniform", 0.8, 0.95),
                              SearchDim("optim.lr", "loguniform", 1e-4, 1e-2),
                              SearchDim("train.micro_batch_size", "randint", 2, 8),
                              SearchDim("model.kernels", "choice", values=["auto", "reference"])])
    out = clip({"optim.beta1": 0.91 * 1.2, "optim.lr": 5e-5, "train.micro_batch_size": 9.6,
                "model.kernels": "auto"})
    assert out == {"optim.beta1": 0.95, "optim.lr": 1e-4, "train.micro_batch_size": 8, "model.kernels": "auto"}
    assert clip({"optim.beta1": 0.9})["optim.beta1"] == 0.9
