"""bench recall: Zoology's MQAR generator, answer bits on hand-made logits, the lr choice, and the
quick grid end to end."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.tasks import TaskExample, mqar_batch, score, value_scores
from pretrain.research.recall import RecallOptions, learning_rate, summarize_points

from helpers import run_cli


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_batch_follows_zoology_conventions(random_non_queries):
    b = mqar_batch(64, 128, 8, 256, seed=3, random_non_queries=random_non_queries)
    again = mqar_batch(64, 128, 8, 256, seed=3, random_non_queries=random_non_queries)
    assert torch.equal(b.inputs, again.inputs) and torch.equal(b.targets, again.targets)
    assert not torch.equal(b.inputs, mqar_batch(64, 128, 8, 256, seed=4).inputs)
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (64, 128)
    near = 0
    for ids, targets, mask in zip(b.inputs.tolist(), b.targets.tolist(), b.mask.tolist()):
        keys, values = ids[0:16:2], ids[1:16:2]
        assert len(set(keys)) == 8 and all(1 <= k < 128 for k in keys)       # lower half
        assert len(set(values)) == 8 and all(128 <= v < 256 for v in values)  # upper half
        value_of = dict(zip(keys, values))
        queries = [p for p in range(128) if mask[p]]
        # every key queried once, after the pairs, at an even offset from their end
        assert sorted(ids[p] for p in queries) == sorted(keys)
        assert all(p >= 16 and (p - 16) % 2 == 0 for p in queries)
        for p in range(128):
            assert targets[p] == (value_of[ids[p]] if mask[p] else 0)  # supervised: values only
        if not random_non_queries:   # fillers are 0: no value is ever shown after its pair
            assert all(ids[p] == 0 for p in range(16, 128) if not mask[p])
        near += sum(p < 16 + 56 for p in queries)      # the nearer half of the query region
    assert near / (64 * 8) > 0.7                       # power-law gaps: near queries likelier
    with pytest.raises(ValueError, match="4 x num_pairs"):
        mqar_batch(2, 30, 8, 256, seed=0)
    with pytest.raises(ValueError, match="keys"):
        mqar_batch(2, 128, 8, 16, seed=0)


class FixedLogits(nn.Module):
    """A model whose next-token logits are given: the same table for every sequence."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits[: ids.shape[1]].expand(ids.shape[0], -1, -1)


def test_answer_bits_on_hand_made_logits():
    # vocab 4; p = (1/2, 1/4, 1/8, 1/8) at every position
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    model = FixedLogits(probs.log().expand(6, 4).clone())
    inputs = torch.tensor([[1, 3, 0, 1, 0, 2]])
    targets = torch.tensor([[0, 0, 0, 0, 2, 0]])
    mask = torch.tensor([[False, False, True, False, True, False]])
    from data_pipeline.tasks import MqarBatch
    got = value_scores(model(inputs), MqarBatch(inputs, targets, mask))
    # position 2: value 0, p = 1/2 -> 1 bit, argmax right; position 4: value 2, p = 1/8 -> 3 bits, wrong
    assert got == {"accuracy": 0.5, "answer_bits": pytest.approx(2.0), "answers": 2}

    # score(): a 2-token answer at positions 3-4 of ids, predicted from positions 2-3
    example = TaskExample("toy", np.array([3, 3, 1, 0, 2, 1]), [(3, 2)], {"n": 1})
    result = score([example], model)
    assert result["accuracy"] == 0.0                           # token 2 is not the argmax
    assert result["answer_bits"] == pytest.approx((1 + 3) / 2)  # -log2(1/2), -log2(1/8)
    assert result["bits_by_setting"] == {"n=1": pytest.approx(2.0)}


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [learning_rate(s, 600, 3e-3, 1 / 3) for s in range(600)]
    assert lrs[0] == pytest.approx(3e-3 / 200) and lrs[199] == pytest.approx(3e-3)
    assert all(a <= b for a, b in zip(lrs[:200], lrs[1:200]))          # rising while warming up
    assert all(a >= b for a, b in zip(lrs[200:], lrs[201:]))            # then only falling
    assert lrs[-1] == pytest.approx(3e-4, rel=1e-3)


def test_the_best_learning_rate_is_reported_per_point():
    o = RecallOptions(mixers=["dense"], lengths=[64], widths=[32], seeds=2, lrs=[1e-3, 3e-3])
    acc = {(1e-3, 0): 0.2, (1e-3, 1): 0.4, (3e-3, 0): 0.9, (3e-3, 1): 0.7}
    points = [{"mixer": "dense", "length": 64, "width": 32, "lr": lr, "seed": s, "pairs": 4,
               "params": 1000, "accuracy": a, "answer_bits": 1 - a} for (lr, s), a in acc.items()]
    [row] = summarize_points(points, o)
    assert row["lr"] == 3e-3 and row["accuracy"]["mean"] == pytest.approx(0.8)
    assert row["accuracy"]["std"] == pytest.approx(math.sqrt(0.02))
    assert row["answer_bits"]["values"] == pytest.approx([0.1, 0.3])


@pytest.mark.integration
def test_bench_recall_quick_writes_results_report_and_plot(tmp_path):
    out = tmp_path / "recall"
    done = run_cli("-m", "pretrain", "bench", "recall", "--quick", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[12/12] fim length 64" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "recall" and results["commit"] and results["hardware"]["cpus"]
    assert {p["mixer"] for p in results["points"]} == {"dense", "window", "fim"}
    assert {p["seed"] for p in results["points"]} == {0, 1}
    assert len(results["points"]) == 3 * 2 * 1 * 2             # mixers x lengths x widths x seeds
    for p in results["points"]:
        assert 0 <= p["accuracy"] <= 1 and p["answers"] == 32 * p["pairs"]
        assert p["answer_bits"] < 8.5     # near log2(256) = 8 after 6 steps, never far above
    assert results["attended_keys"]["window"] == {"32": 16, "64": 16}
    assert results["attended_keys"]["dense"] == {"32": 32, "64": 64}
    report = (out / "report.md").read_text()
    cells = [next(r["accuracy"] for r in results["summary"] if (r["mixer"], r["length"], r["width"]) ==
                  ("fim", n, 32)) for n in (32, 64)]
    assert "| fim | 32 | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |" in report
    assert "## Bits per answer token" in report and "![accuracy and bits" in report
    assert (out / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a bad mixer name is a one-line error
    bad = run_cli("-m", "pretrain", "bench", "recall", "--quick", "--mixers", "mamba", "--out", str(out))
    assert bad.returncode == 2 and "--mixers: 'mamba'" in bad.stderr
