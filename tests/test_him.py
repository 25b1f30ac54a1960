"""HIM: the design's parameter budget, causality of memory and reasoning buffer, the optimizer
options (Lion, multi-speed groups, OneCycle), pruning and int8 quantization, and the trainer."""
import math
import shutil

import pytest
import torch

from pretrain.core.config import ConfigError, load_config

from helpers import ROOT, losses_by_step, run_cli, train_cmd


def him_config(**extra):
    values = {"model.num_layers": 3, "model.hidden_size": 64, "model.num_attention_heads": 4,
              "model.num_query_groups": 2, "model.ffn_hidden_size": 96, "model.seq_length": 40,
              "model.vocab_size": 50, "model.him.chunk_size": 8, "model.him.reasoning_tokens": 6,
              "model.him.memory_slots": 5, "model.him.memory_rank": 4, "model.him.decoder_tokens": 7,
              "model.him.reasoning_every": 1, **extra}
    return load_config(ROOT / "configs" / "him_tiny.yaml", [f"{k}={v}" for k, v in values.items()])


def test_the_default_config_matches_the_designs_parameter_budget_and_prints_the_table(capsys):
    from model import get_family
    from model.him.model import DESIGN_TABLE, component_counts

    cfg = load_config(ROOT / "configs" / "him_7m.yaml")
    model = get_family("him").build(cfg.model, cfg.parallel)
    count = sum(p.numel() for p in model.parameters())
    assert count == get_family("him").parameter_count(cfg.model) == component_counts(cfg.model)["total"]
    assert abs(count - DESIGN_TABLE["total"]) / DESIGN_TABLE["total"] < 0.01
    for row in ("attention", "memory_interface", "gates", "reasoning", "memory", "decoder"):
        assert component_counts(cfg.model)[row] == DESIGN_TABLE[row], row   # the rows that add up
    printed = capsys.readouterr().err
    assert "HIM component" in printed and f"{count:,}" in printed and "7,157,680" in printed


@pytest.mark.parametrize("cognitive", [True, False], ids=["cognitive", "ablation"])
def test_a_prediction_depends_only_on_earlier_tokens(cognitive):
    """Changing token j leaves every logit before position j unchanged, with memory writes and
    buffer refinements at chunk granularity, for positions inside and at the edge of chunks."""
    from model.him.model import HimLM

    cfg = him_config(**{"model.him.cognitive": cognitive}).model
    torch.manual_seed(0)
    model = HimLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 37))                   # not a multiple of the chunk
    with torch.no_grad():
        base = model(ids)
        for j in (0, 7, 8, 20, 36):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 1) % 50
            out = model(changed)
            assert torch.equal(out[:, :j], base[:, :j]), j
            assert not torch.allclose(out[:, j:], base[:, j:]), j


def test_memory_and_buffer_carry_information_across_chunks():
    """A token of chunk 0 reaches chunk 3 through memory and buffer even without attention."""
    from model.him.model import HimLM

    cfg = him_config().model
    torch.manual_seed(0)
    model = HimLM(cfg).eval()
    for layer in model.layers:        # cut attention: only the chunk states can carry it
        torch.nn.init.zeros_(layer.attn.o.weight)
    ids = torch.randint(0, 50, (1, 32))
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, 3:8], b[:, 3:8])              # the rest of chunk 0 sees no state change
    assert not torch.allclose(a[:, 24:], b[:, 24:])       # chunk 3 does


def test_auxiliary_losses_and_cognitive_metrics_are_reported_in_training():
    from model.him.model import HimLM

    cfg = him_config().model
    model = HimLM(cfg).train()
    ids = torch.randint(0, 50, (2, 40))
    loss = model(ids, ids)
    eval_loss = HimLM.forward(model.eval(), ids, ids)
    metrics = model.log_metrics()
    for key in ("aux_memory_sparsity", "aux_reasoning_diversity", "aux_routing_balance",
                "memory_utilization", "reasoning_buffer_change", "slow_share_layer0", "slow_share_layer2"):
        assert key in metrics and math.isfinite(metrics[key]), key
    hc = cfg.him
    aux = (hc.memory_sparsity_weight * metrics["aux_memory_sparsity"]
           + hc.reasoning_diversity_weight * metrics["aux_reasoning_diversity"]
           + hc.routing_balance_weight * metrics["aux_routing_balance"])
    assert float((loss.mean() - eval_loss.mean()).detach()) == pytest.approx(aux, rel=1e-4)  # eval: the LM loss only


def test_multispeed_groups_onecycle_and_lion():
    from model.him.model import HimLM
    from pretrain.core.engine import SPEED_FACTORS, build_optimizer, lr_lambda

    cfg = him_config(**{"optim.name": "lion", "optim.param_groups": "multispeed", "optim.schedule": "onecycle",
                        "optim.lr": 1e-3, "train.steps": 100, "parallel.zero_stage": 0})
    model = HimLM(cfg.model)
    optimizer = build_optimizer(cfg, model)
    speed = {id(p): g["speed"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert speed[id(named["layers.0.attn.q.weight"])] == speed[id(named["layers.1.ffn.up.weight"])] == "slow"
    assert speed[id(named["layers.0.gate.weight"])] == "fast"
    assert speed[id(named["memory.init"])] == speed[id(named["layers.2.mem_key.weight"])] == "cognitive"
    assert speed[id(named["reasoning.down.weight"])] == "cognitive"
    assert speed[id(named["embedding.weight"])] == speed[id(named["decoder_norm.weight"])] == "standard"
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * SPEED_FACTORS[group["speed"]])
        assert group["weight_decay"] == (cfg.optim.weight_decay if group["decays"] else 0.0)
    assert type(optimizer).__name__ == "SkippingLion"
    factor = lr_lambda(cfg)
    assert factor(0) == pytest.approx(1 / 25)
    assert factor(10) == pytest.approx(1.0)                # the peak at pct_start 0.1
    assert factor(100) == pytest.approx(1 / 25 / 1000)
    assert all(factor(s) <= factor(s + 1) for s in range(10)) and all(factor(s) >= factor(s + 1) for s in range(10, 100))
    with pytest.raises(ConfigError, match="optim.name"):
        him_config(**{"optim.name": "rmsprop"})


def test_int8_quantization_stays_close_to_the_float_model():
    """Tolerance: after a little training, the int8 model's next-token distributions are within
    0.02 nats (mean KL) of the float model's and agree on the top token at >= 95% of positions."""
    from model.him.model import HimLM
    from pretrain.tools.quantize import quantize_int8

    cfg = him_config().model
    torch.manual_seed(0)
    model = HimLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = (torch.arange(40)[None] * torch.arange(1, 9)[:, None]) % 50   # learnable sequences
    for _ in range(40):
        optimizer.zero_grad()
        model(ids, ids.roll(-1, 1)).mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(ids), -1)
        quantized = quantize_int8(model, cfg)
        approx = torch.log_softmax(quantized(ids), -1)
    assert isinstance(quantized.head, torch.ao.nn.quantized.dynamic.Linear)       # the untied head too
    assert isinstance(quantized.layers[0].ffn.up, torch.ao.nn.quantized.dynamic.Linear)
    kl = (reference.exp() * (reference - approx)).sum(-1).mean()
    assert kl < 0.02
    assert (reference.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.95


@pytest.mark.integration
def test_him_trains_with_lion_resumes_exactly_and_compresses_to_an_int8_generator(dataset, tmp_path):
    """`pretrain train` (Lion, multi-speed groups, OneCycle, ZeRO-0): uninterrupted vs resumed
    losses equal; `compress` prunes and fine-tunes; `generate --int8` runs the result."""
    import json

    extra = {"model.name": "him", "model.sliding_window": 0, "model.him.chunk_size": 16,
             "model.him.reasoning_tokens": 8, "optim.name": "lion", "optim.lr": 1e-3,
             "optim.param_groups": "multispeed", "optim.schedule": "onecycle", "parallel.zero_stage": 0,
             "train.steps": 8, "train.checkpoint_every": 4, "train.keep_last": 0}
    run_dir = tmp_path / "run"
    full = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    assert "HIM component" in full.stderr
    uninterrupted = losses_by_step(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004")
    again = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    resumed = losses_by_step(run_dir)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step

    out = tmp_path / "compressed"
    done = run_cli("-m", "pretrain", "compress", "--ckpt", str(run_dir), "--out", str(out), "--prune", "0.3",
                   "--finetune-steps", "3", "--eval-batches", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "compress.json").read_text())
    assert report["linear_sparsity"] >= 0.3 - 1e-3
    assert all(math.isfinite(report[k]) for k in ("bpb_trained", "bpb_pruned", "bpb_finetuned", "bpb_int8"))
    text = run_cli("-m", "pretrain", "generate", "--ckpt", str(out), "--int8", "--prompt", "To be",
                   "--max-new-tokens", "20", "--seed", "0")
    assert text.returncode == 0, text.stderr[-2000:]
    assert text.stdout.startswith("To be") and len(text.stdout) > len("To be\n")


@pytest.mark.parametrize("cognitive", [True, False], ids=["cognitive", "ablation"])
def test_incremental_decoding_equals_the_full_forward(cognitive):
    """KV caches plus chunk states (model/him/decode.py): token-by-token logits equal the full
    forward's at every position, across chunk boundaries, memory writes and buffer refinements."""
    from model.him.model import HimLM

    cfg = him_config(**{"model.him.cognitive": cognitive, "model.him.reasoning_every": 2,
                        "model.num_layers": 4}).model
    torch.manual_seed(0)
    model = HimLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 37))
    with torch.no_grad():
        full = model(ids)
        state = model.initial_state(2)
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], atol=2e-5, rtol=1e-4)
        # Past the 40 positions: the state restarts on the last half window, new token included.
        longer = torch.cat([ids, torch.randint(0, 50, (2, 8))], 1)
        for t in range(ids.shape[1], longer.shape[1]):
            logits, state = model.step(longer[:, t], state)
            window = longer[:, 40 + 1 - 20:t + 1] if t >= 40 else longer[:, :t + 1]
            torch.testing.assert_close(logits, model(window)[:, -1], atol=2e-5, rtol=1e-4)


@pytest.mark.integration
def test_bench_generate_reports_float_and_int8_speed_and_memory_per_batch(tmp_path):
    import json

    out = tmp_path / "gen"
    done = run_cli("-m", "pretrain", "bench", "generate", "--config", str(ROOT / "configs" / "him_tiny.yaml"),
                   "--set", "model.vocab_size=64", "--set", "model.num_layers=2", "--new-tokens", "3",
                   "--prompt-tokens", "2", "--batch", "1", "2", "--decode", "cached", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["mode"], r["batch"]) for r in runs] == [("float", 1), ("int8", 1), ("float", 2), ("int8", 2)]
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] >= r["runtime_rss_mb"] > 0
    assert runs[0]["float_params"] > runs[1]["float_params"]     # int8: the linear weights left float
    assert "| int8 | cached | 2 |" in (out / "report.md").read_text()
