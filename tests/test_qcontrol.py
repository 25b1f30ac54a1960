"""The Q-learning LR/momentum controller: its update rule, bounds and state, and in the trainer
(decisions logged, LR and momentum applied, exact resume with the Q-table in the checkpoint)."""
import copy

import pytest
import torch

from pretrain.core.config import ConfigError, QControlConfig, load_config
from pretrain.core.metrics import read_metrics
from pretrain.core.qcontrol import ACTIONS, QController

from helpers import ROOT, losses_by_step, run_cli, train_cmd


def feed(controller, losses, norm=1.0):
    out = []
    for loss in losses:
        decision = controller.observe(torch.tensor(loss), norm)
        if decision is not None:
            out.append(decision)
    return out


def test_one_decision_per_window_and_the_q_update_rule():
    cfg = QControlConfig(enabled=True, every=2, epsilon=0.0, epsilon_min=0.0, alpha=0.5, gamma=0.9,
                         stability_weight=0.0)
    c = QController(cfg, momentum=0.9)
    first = feed(c, [4.0, 4.0])
    assert len(first) == 1 and first[0]["reward"] is None       # nothing to reward yet
    s0, a0 = first[0]["state"], first[0]["action"]
    assert c.q[s0] == [0.0] * len(ACTIONS)
    second = feed(c, [3.0, 3.0])[0]                              # 25% better than the last window
    assert second["reward"] == pytest.approx(25.0)
    # Q(s0, a0) += alpha (r + gamma max Q(s1) - Q(s0, a0)), with Q(s1) all zero
    assert c.q[s0][a0] == pytest.approx(0.5 * 25.0)
    assert second["state"].startswith("trend3")                  # "much better" bucket
    lr, mom = ACTIONS[a0]
    assert first[0]["lr_scale"] == pytest.approx(lr) and first[0]["momentum"] == pytest.approx(min(0.9 * mom, 0.99))


def test_factors_stay_within_bounds_and_exploration_decays():
    bounds = dict(lr_scale_min=0.5, lr_scale_max=2.0, momentum_min=0.85, momentum_max=0.95)
    always = QController(QControlConfig(enabled=True, every=1, epsilon=1.0, epsilon_min=1.0, **bounds), 0.9)
    decisions = feed(always, [5.0 - 0.01 * i for i in range(300)], norm=torch.tensor(2.0))
    assert len(decisions) == 300 and all(d["explored"] for d in decisions)
    assert all(0.5 <= d["lr_scale"] <= 2.0 and 0.85 <= d["momentum"] <= 0.95 for d in decisions)
    assert {0.5, 2.0} <= {d["lr_scale"] for d in decisions}    # the random walk met both bounds
    assert {0.85, 0.95} <= {d["momentum"] for d in decisions}
    decaying = QController(QControlConfig(enabled=True, every=1, epsilon=1.0, epsilon_decay=0.9,
                                          epsilon_min=0.05), 0.9)
    last = feed(decaying, [5.0 - 0.01 * i for i in range(100)])[-1]
    assert last["epsilon"] == pytest.approx(0.05)


def test_a_restored_controller_makes_the_same_decisions():
    cfg = QControlConfig(enabled=True, every=3, epsilon=0.5, seed=7)
    losses = [4.0 / (1 + 0.05 * i) + 0.1 * ((i * 37) % 5) for i in range(60)]
    a = QController(cfg, 0.9)
    feed(a, losses[:31])                                         # stops inside a window
    b = QController(cfg, 0.9)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert feed(a, losses[31:]) == feed(b, losses[31:])


def test_the_momentum_must_start_within_the_bounds():
    with pytest.raises(ConfigError, match="optim.beta1=0.7 must lie within"):
        load_config(None, ["optim.qcontrol.enabled=true", "optim.beta1=0.7"])
    with pytest.raises(ConfigError, match="lr_scale_min"):
        load_config(None, ["optim.qcontrol.lr_scale_min=2.0"])


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"], ids=["adamw", "enhanced-sgd"])
def test_the_trainer_applies_logs_and_resumes_the_controller_exactly(dataset, tmp_path, optimizer):
    """With optim.name=sgd this is the BSFIN design's EnhancedSGD: SGD whose LR and momentum the
    controller drives."""
    import shutil

    extra = {"optim.name": optimizer, "optim.qcontrol.enabled": "true", "optim.qcontrol.every": 2,
             "optim.qcontrol.epsilon": 0.5, "optim.warmup_steps": 0, "train.steps": 12,
             "train.checkpoint_every": 6, "train.keep_last": 0, "optim.min_lr": 3e-3}
    run_dir = tmp_path / "run"
    full = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert full.returncode == 0, full.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    decisions = [r for r in records if r.get("split") == "qcontrol"]
    assert [d["step"] for d in decisions] == list(range(2, 13, 2))
    # constant schedule (min_lr = lr, no warmup): the logged LR is lr x the controller's factor
    train = {r["step"]: r for r in records if "split" not in r}
    for d in decisions[:-1]:
        assert train[d["step"] + 1]["lr"] == pytest.approx(3e-3 * d["lr_scale"])
    uninterrupted = losses_by_step(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    (run_dir / "checkpoints" / "latest").write_text("step_00000006")
    again = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = losses_by_step(run_dir)
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
    replayed = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "qcontrol"]
    assert [{k: v for k, v in d.items()} for d in replayed if d["step"] > 6] == decisions[3:]


def test_the_controller_sets_sgds_momentum():
    from pretrain.core.engine import build_optimizer
    from pretrain.core.qcontrol import QController

    cfg = load_config(ROOT / "configs" / "mistral_tiny.yaml", ["optim.name=sgd", "parallel.zero_stage=0",
                                                               "optim.qcontrol.enabled=true", "optim.beta1=0.9"])
    optimizer = build_optimizer(cfg, torch.nn.Linear(4, 4))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    controller = QController(cfg.optim.qcontrol, 0.9)
    controller.momentum = 0.93
    controller.apply(scheduler)
    assert all(group["momentum"] == 0.93 for group in optimizer.param_groups)
