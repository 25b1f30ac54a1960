import pytest

from pretrain.core.config import ConfigError, load_config, parse_override

from helpers import ROOT, run_cli

TINY = ROOT / "configs" / "mistral_tiny.yaml"


def test_shipped_configs_validate():
    tiny = load_config(TINY)
    assert tiny.model.name == "mistral" and tiny.parallel.zero_stage == 1
    big = load_config(ROOT / "configs" / "mistral_7b.yaml")
    assert (big.model.num_layers, big.model.hidden_size, big.model.num_query_groups) == (32, 4096, 8)
    from model import get_family

    for path in sorted((ROOT / "configs").glob("*.yaml")):   # every run config loads and sizes
        cfg = load_config(path, [] if load_config(path).model.vocab_size else ["model.vocab_size=384"])
        assert get_family(cfg.model.name).parameter_count(cfg.model) > 0, path.name


def test_overrides_are_typed():
    cfg = load_config(TINY, ["train.steps=7", "optim.lr=1e-3", "log.wandb=false", "train.run_dir=x/y"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.log.wandb is False
    assert cfg.train.run_dir == "x/y"
    assert isinstance(load_config(TINY, ["optim.lr=1"]).optim.lr, float)  # int accepted as float


@pytest.mark.parametrize("override, named", [
    ("model.no_such_key=1", "no_such_key"),
    ("nosection.steps=1", "nosection"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("parallel.dtype=fp8", "parallel.dtype"),
    ("log.wandb=maybe", "log.wandb"),
    ("model.num_query_groups=3", "model.num_query_groups"),
    ("optim.beta2=1.0", "optim.beta2"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert named in message and "\n" not in message


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"allowed in model: .*hidden_size"):
        load_config(TINY, ["model.hiden_size=3"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs" / "missing.yaml")
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TINY, ["train.steps.x=1"])


@pytest.mark.integration
def test_cli_reports_unknown_key_in_one_line():
    result = run_cli("-m", "pretrain", "train", "--config", str(TINY), "--set", "model.no_such_key=1")
    assert result.returncode == 2
    assert "no_such_key" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_cli_help_documents_every_option():
    result = run_cli("-m", "pretrain", "train", "--help")
    assert result.returncode == 0
    for flag in ("--config", "--set", "--resume", "--dry-run", "--world-size"):
        assert flag in result.stdout


@pytest.mark.integration
def test_dry_run_sizes_7b_without_allocating():
    result = run_cli("-m", "pretrain", "train", "--config", str(ROOT / "configs" / "mistral_7b.yaml"),
                     "--dry-run", "--world-size", "64")
    assert result.returncode == 0, result.stderr
    assert "7,241,732,096 parameters" in result.stdout  # Mistral-7B-v0.1
    assert "tp 8 x pp 1 x dp 8" in result.stdout and "total" in result.stdout


@pytest.mark.integration
def test_dry_run_rejects_impossible_layout():
    result = run_cli("-m", "pretrain", "train", "--config", str(ROOT / "configs" / "mistral_7b.yaml"),
                     "--dry-run", "--world-size", "12")
    assert result.returncode == 2 and "world size 12" in result.stderr


@pytest.mark.parametrize("sets, message", [
    (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.pp=2 needs parallel.zero_stage 0 or 1"),
    (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tp > 1"),
    (["train.compile=true", "parallel.pp=2", "parallel.zero_stage=1"],
     "train.compile=true needs parallel.pp=1"),
    (["train.compile=true", "parallel.zero_stage=3"], "train.compile=true needs parallel.pp=1"),
])
def test_parallel_options_that_cannot_work_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, sets)
