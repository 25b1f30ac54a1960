"""The fractal families: fractal Mamba (seeded architecture, recurrent generation) and
FractalFormer (nested sub-models: extraction, joint training), and both through the trainer."""
import pytest
import torch

from pretrain.core.config import ConfigError, load_config

from helpers import ROOT, losses_by_step, run_cli, torchrun, train_cmd


def model_config(name: str, **extra):
    values = {"model.name": name, "model.num_layers": 2, "model.hidden_size": 64,
              "model.num_attention_heads": 4, "model.num_query_groups": 2,
              "model.ffn_hidden_size": 128, "model.seq_length": 24, "model.sliding_window": 0,
              "model.vocab_size": 40, "model.fractal_mamba.width_min": 16,
              "model.fractal_mamba.width_max": 40, "model.fractal_mamba.depth_max": 3, **extra}
    return load_config(ROOT / "configs" / "mistral_tiny.yaml", [f"{k}={v}" for k, v in values.items()]).model


def build(name: str, seed: int = 0, **extra):
    from model import get_family

    cfg = model_config(name, **extra)
    torch.manual_seed(seed)
    return get_family(name).build(cfg, load_config().parallel), cfg


def test_fractal_mamba_architecture_is_drawn_by_its_seed_within_the_ranges():
    from model import get_family
    from model.fractal_mamba.model import draw_architecture

    cfg = model_config("fractal_mamba", **{"model.fractal_mamba.modules_per_layer": 3})
    arch = draw_architecture(cfg)
    assert arch == draw_architecture(model_config("fractal_mamba", **{"model.fractal_mamba.modules_per_layer": 3}))
    assert len(arch) == 2 and all(len(layer) == 3 for layer in arch)
    assert all(1 <= d <= 3 and 16 <= w <= 40 and w % 8 == 0 for layer in arch for d, w in layer)
    other = model_config("fractal_mamba", **{"model.fractal_mamba.modules_per_layer": 3,
                                             "model.fractal_mamba.architecture_seed": 1})
    assert draw_architecture(other) != arch
    # a fractal block of depth c holds 2^c - 1 units; the closed-form size counts them
    model, _ = build("fractal_mamba", **{"model.fractal_mamba.modules_per_layer": 3})
    for layer, drawn in zip(model.layers, arch):
        for module, (depth, width) in zip(layer.fractals, drawn):
            units = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][1:-1]
            assert len(units) == 2 ** depth - 1 and units[0].in_features == width
    assert get_family("fractal_mamba").parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    assert "architecture_seed 0" in model.describe()


def test_fractal_mamba_is_causal_and_its_recurrent_steps_equal_the_parallel_forward():
    model, cfg = build("fractal_mamba", **{"model.fractal_mamba.drop_path": 0.3})
    model.eval()  # drop-path is a training-time regularizer
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = model(ids)
        changed = ids.clone()
        changed[:, 9] = (changed[:, 9] + 1) % cfg.vocab_size
        torch.testing.assert_close(model(changed)[:, :9], parallel[:, :9], atol=0, rtol=0)
        state, steps = model.initial_state(2), []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), parallel, atol=1e-5, rtol=1e-5)


def test_fractal_mamba_drop_path_samples_paths_in_training_only():
    model, cfg = build("fractal_mamba", **{"model.fractal_mamba.drop_path": 0.5,
                                           "model.fractal_mamba.depth_min": 2})
    ids = torch.randint(0, cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(ids)
        torch.manual_seed(1)
        b = model(ids)
        model.eval()
        assert torch.equal(model(ids), model(ids))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("upstream", [False, True], ids=["independent", "upstream-residual"])
def test_fractalformer_sub_models_extract_to_standalone_models_with_the_same_logits(upstream):
    from model import get_family

    model, cfg = build("fractalformer", **{"model.fractalformer.upstream_residual": upstream})
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        levels = model.level_logits(ids)
        assert [lv.shape[0] for lv in levels] == [1, 2, 4]
        torch.testing.assert_close(model(ids), levels[0][0])
        for level, index in [(1, 0), (1, 1), (2, 3)]:
            sub = model.extract(level, index)
            assert sub.cfg.hidden_size == 64 // 2 ** level and sub.levels == 3 - level
            assert sum(p.numel() for p in sub.parameters()) == get_family("fractalformer").parameter_count(sub.cfg)
            torch.testing.assert_close(sub(ids), levels[level][index], atol=1e-5, rtol=1e-5)
            if level == 1:  # its own sub-models are the full model's level-2 models under it
                torch.testing.assert_close(sub.level_logits(ids)[1], levels[2][2 * index: 2 * index + 2],
                                           atol=1e-5, rtol=1e-5)
    # the sub-models share the full model's weights: a change to one of its blocks reaches them
    with torch.no_grad():
        model.layers[0].w_up[:32, :32] += 0.5
        assert not torch.allclose(model.level_logits(ids)[1][0], levels[1][0])
        torch.testing.assert_close(model.level_logits(ids)[1][1], levels[1][1])
    with pytest.raises(ValueError, match="no model 4 at level 2"):
        model.extract(2, 4)


def test_fractalformer_joint_training_lowers_every_levels_loss(dataset):
    """Joint training on real text: each level's held-out loss falls."""
    from data_pipeline.loader import StreamingLoader

    model, cfg = build("fractalformer", **{"model.vocab_size": 384, "model.seq_length": 64})
    train = StreamingLoader(dataset, "train", 64, 8, seed=0)
    held_out = next(iter(StreamingLoader(dataset, "val", 64, 8, seed=0, epochs=1)))

    def level_losses():
        with torch.no_grad():
            logits = model.level_logits(held_out["input_ids"])
            return [torch.nn.functional.cross_entropy(lv.flatten(0, 2), held_out["labels"].repeat(lv.shape[0], 1).flatten()).item()
                    for lv in logits]

    before = level_losses()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _, batch in zip(range(40), train):
        loss = model(batch["input_ids"], batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(model.log_metrics()) == {"loss_level0", "loss_level1", "loss_level2"}
    after = level_losses()
    for level, (b, a) in enumerate(zip(before, after)):
        assert a < b - 0.5, (level, before, after)


def test_fractal_configs_are_validated_with_the_key_named():
    with pytest.raises(ConfigError, match="hidden_size / num_attention_heads=16 must be divisible by 32"):
        model_config("fractalformer", **{"model.fractalformer.levels": 5})
    with pytest.raises(ConfigError, match="level_weights"):
        model_config("fractalformer", **{"model.fractalformer.level_weights": "[1.0]"})
    with pytest.raises(ConfigError, match="no multiple of 8"):
        model_config("fractal_mamba", **{"model.fractal_mamba.width_min": 17,
                                         "model.fractal_mamba.width_max": 23})
    with pytest.raises(ConfigError, match="sliding_window is not supported by fractalformer"):
        model_config("fractalformer", **{"model.sliding_window": 8})


def test_fractal_families_refuse_model_parallel_layouts(dataset, tmp_path):
    from pretrain.core.parallel import validate_layout

    for name in ("fractal_mamba", "fractalformer"):
        cfg = load_config(ROOT / "configs" / "mistral_tiny.yaml",
                          [f"model.name={name}", "model.sliding_window=0", "parallel.tp=2"])
        with pytest.raises(ConfigError, match=f"parallel.tp=2: model.name={name} supports data parallelism"):
            validate_layout(cfg, 2)


FAMILY_RUNS = {
    "fractal_mamba": {"model.fractal_mamba.width_min": 16, "model.fractal_mamba.width_max": 32,
                      "model.fractal_mamba.drop_path": 0.2},  # drop-path: the RNG must resume too
    "fractalformer": {"model.fractalformer.upstream_residual": True},
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(FAMILY_RUNS))
def test_fractal_families_train_with_zero2_on_two_ranks_and_resume_exactly(dataset, tmp_path, name):
    """`pretrain train` on two gloo ranks with ZeRO-2: 10 uninterrupted steps vs stopping after 5
    and resuming give the same losses; the loss falls; the checkpoint generates text."""
    import shutil

    extra = {"model.name": name, "model.sliding_window": 0, "parallel.zero_stage": 2,
             "train.steps": 10, "train.checkpoint_every": 5, "train.keep_last": 0,
             "optim.lr": 1e-2, **FAMILY_RUNS[name]}
    run_dir = tmp_path / "run"
    full = torchrun(2, train_cmd(dataset, run_dir, **extra))
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    uninterrupted = losses_by_step(run_dir)
    assert uninterrupted[10] < uninterrupted[1] - 0.5
    shutil.rmtree(run_dir / "checkpoints" / "step_00000010")
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")
    again = torchrun(2, train_cmd(dataset, run_dir, **extra))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    resumed = losses_by_step(run_dir)
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
    text = run_cli("-m", "pretrain", "generate", "--ckpt", str(run_dir), "--prompt", "To be",
                   "--max-new-tokens", "20", "--seed", "0")
    assert text.returncode == 0, text.stderr[-2000:]
    assert text.stdout.startswith("To be") and len(text.stdout) > len("To be\n")
