"""The model registry: what each family declares it supports matches what its model has, config
validation reads the declarations, and a new family is a folder plus one ``register`` call."""
import json
import textwrap

import pytest
import torch

from model import families, get_family, hooks
from pretrain.core.config import ConfigError, load_config

from helpers import ROOT, run_cli, tiny_overrides

# Supports flag -> the Protocol a model with that flag implements
HOOKS = {"incremental_decoding": hooks.IncrementalDecoder, "speed_groups": hooks.SpeedGroups,
         "training_metrics": hooks.TrainingMetrics, "describes_itself": hooks.Describes,
         "untied_head": hooks.UntiesHead, "pretrained_parts": hooks.PretrainedParts}
TINY = {"mistral": "mistral_tiny", "fim_mistral": "fim_mistral_tiny", "fractal_mamba": "fractal_mamba_tiny",
        "fractalformer": "fractalformer_tiny", "him": "him_tiny", "bsfin": "bsfin_tiny"}


def test_every_family_declares_exactly_the_hooks_its_model_has(session):
    assert {f.name for f in families()} == set(TINY)
    for family in families():
        cfg = load_config(ROOT / "configs" / f"{TINY[family.name]}.yaml", ["model.vocab_size=258"])
        model = family.build(cfg.model, cfg.parallel)
        for flag, protocol in HOOKS.items():
            assert isinstance(model, protocol) == getattr(family.supports, flag), (family.name, flag)


def test_validation_reads_the_declarations(tmp_path):
    tiny = ROOT / "configs" / "mistral_tiny.yaml"
    assert not get_family("him").supports.document_masking
    with pytest.raises(ConfigError, match="data.mask_documents=true is not supported by him"):
        load_config(tiny, ["model.name=him", "model.sliding_window=0", "data.mask_documents=true"])
    with pytest.raises(ConfigError, match="multispeed: mistral defines no speed groups"):
        load_config(tiny, ["optim.param_groups=multispeed"])
    with pytest.raises(ConfigError, match="sequence_parallel=true is not supported by fim_mistral"):
        load_config(tiny, ["model.name=fim_mistral", "parallel.tp=2", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="model.name='nope' is not registered"):
        load_config(tiny, ["model.name=nope"])
    # a section's own fields are checked before the rules that tie it to the shared fields
    with pytest.raises(ConfigError, match=r"^model.num_layers=-1 must be > 0$"):
        load_config(ROOT / "configs" / "fim_mistral_tiny.yaml", ["model.num_layers=-1"])


TOY_CONFIG = '''
from dataclasses import dataclass

from model.config import ConfigError, Section


@dataclass
class ToyConfig(Section):
    context: int = 2                  # tokens each prediction sees (a bag of embeddings)

    def validate(self):
        if self.context < 1:
            raise ConfigError(f"model.toy.context={self.context} must be >= 1")
'''
TOY_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class ToyLM(nn.Module):
    """Next token from the sum of the last ``context`` token embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.context = cfg.toy.context
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, labels=None):
        x = self.embedding(input_ids)
        h = sum(F.pad(x, (0, 0, k, 0))[:, : x.shape[1]] for k in range(self.context))
        logits = self.head(h)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)


def build(cfg, par):
    return ToyLM(cfg)


def parameter_count(cfg):
    return 2 * cfg.vocab_size * cfg.hidden_size


def training_flops_per_token(cfg):
    return 6.0 * cfg.vocab_size * cfg.hidden_size
'''
DRIVER = '''
import sys

sys.path.insert(0, sys.argv[1])
from model import ModelFamily, Supports, register  # noqa: E402
from toy.config import ToyConfig  # noqa: E402

register(ModelFamily("toy", "toy.model", "a bag-of-embeddings toy", "toy", ToyConfig, Supports()))

from pretrain.__main__ import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.integration
def test_a_new_family_is_its_folder_plus_one_registry_call_and_trains(dataset, tmp_path):
    package = tmp_path / "plugins" / "toy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(textwrap.dedent(TOY_CONFIG))
    (package / "model.py").write_text(textwrap.dedent(TOY_MODEL))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    run_dir = tmp_path / "run"
    sets = tiny_overrides(dataset, run_dir, **{"model.name": "toy", "model.sliding_window": 0,
                                               "model.toy.context": 3, "train.steps": 2})
    args = [str(tmp_path / "driver.py"), str(tmp_path / "plugins"), "train",
            "--config", str(ROOT / "configs" / "mistral_tiny.yaml")]
    for item in sets:
        args += ["--set", item]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "split" not in r]
    assert steps == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert "model toy:" in done.stdout + done.stderr
    # the section it registered is validated like a built-in one
    refused = run_cli(*args, "--set", "model.toy.context=0")
    assert refused.returncode == 2 and "model.toy.context=0 must be >= 1" in refused.stderr
