"""KV-cache decoding of the megatron-core families (model/mistral/decode.py,
model/fim_mistral/decode.py): each step's logits equal the full forward's, past the sliding
window, across FIM's blocks, summaries and routing, and past ``seq_length``."""
import pytest
import torch

from model.fim_mistral.config import FimLayerConfig

from helpers import build_model

# The session's tiny config: 2 layers, seq_length 64, batch of 2 streams below.
CASES = {
    "mistral": {"name": "mistral", "sliding_window": 16},
    "mistral-no-window": {"name": "mistral", "sliding_window": 0},
    # FIM: 16 blocks of 4 tokens, 4 levels, top-2 routing; the second layer with its own geometry
    "fim": {"name": "fim_mistral", "fim.block_size": 4},
    "fim-per-layer": {"name": "fim_mistral", "fim.block_size": 4,
                      "fim.layers": [FimLayerConfig(), FimLayerConfig(block_size=8, branching=3, top_k=1)]},
}


def configure(cfg, settings: dict):
    for key, value in settings.items():
        section, _, field = key.rpartition(".")
        setattr(cfg.model.fim if section == "fim" else cfg.model, field, value)
    cfg.model.init_std = 0.1  # sharper attention than the default init: a wrong key shows up
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_decoding_equals_the_full_forward(session, case):
    """A 24-token prompt fed token by token, then 56 greedy tokens: 80 positions, past the
    window (16) and past seq_length (64), where the caches restart on the last half window."""
    model = build_model(configure(session, CASES[case])).eval()
    n = session.model.seq_length
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state, start, length = model.initial_state(2), 0, 0
        for t in range(80):
            logits, state = model.step(ids[:, t], state)
            # the context the caches hold: everything, or since the last restart
            start, length = (t - (n // 2 - 1), n // 2) if length == n else (start, length + 1)
            full = model(ids[:, start:t + 1])[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
            if t + 1 >= ids.shape[1]:  # past the prompt: greedy, the same token both ways
                assert torch.equal(logits.argmax(-1), full.argmax(-1))
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert start > 0 and ids.shape[1] == 81



@pytest.mark.integration
def test_bench_generate_puts_cached_beside_rerun_decoding(tmp_path):
    import json

    from helpers import ROOT, run_cli

    out = tmp_path / "gen"
    done = run_cli("-m", "pretrain", "bench", "generate", "--config", str(ROOT / "configs" / "mistral_tiny.yaml"),
                   "--set", "model.vocab_size=64", "--set", "model.num_layers=1", "--set", "model.seq_length=8",
                   "--set", "model.sliding_window=4", "--modes", "float", "--new-tokens", "6",
                   "--prompt-tokens", "3", "--batch", "2", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["decode"], r["batch"]) for r in results["runs"]] == [
        ("float", "cached", 2), ("float", "rerun", 2)]
    [gain] = results["gains"]
    assert (gain["mode"], gain["batch"]) == ("float", 2) and gain["cached_over_rerun"] > 0
    report = (out / "report.md").read_text()
    assert "| float | cached | 2 |" in report and "Cached over re-run tokens/s: float batch 2:" in report
