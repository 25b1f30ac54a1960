"""train.init_from=hf:DIR: a transformers MistralForCausalLM built and saved here loads into our
model (one safetensors file or a sharded index, tied or not) at TP=1 and TP=2 with transformers'
logits, trains from there at TP=2 and PP=2, and a checkpoint of another shape is a one-line error."""
import json

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.loader import StreamingLoader
from model import get_family
from pretrain.core import hf_init
from pretrain.core.config import ConfigError, load_config, save_config
from pretrain.core.metrics import read_metrics
from pretrain.core.trainer import resolve_vocab

from helpers import run_cli, tiny_config, torchrun, train_cmd

# the shape of tests/helpers.py's tiny config; 384 = the byte tokenizer's 258 padded to 128
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=32, tie_word_embeddings=False)


def save_hf(out, max_shard_size="50GB", **changes):
    """A seeded random MistralForCausalLM saved with save_pretrained. Norm weights are drawn
    too (not left at 1), so swapping two norms, or any two same-shaped matrices, shows."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**TINY, **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"single": save_hf(root / "single"),
            "sharded": save_hf(root / "sharded", max_shard_size="50KB"),
            "tied": save_hf(root / "tied", tie_word_embeddings=True)}


def hf_logits(hf_dir, ids):
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def input_ids():
    return torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))


def init_config(dataset, tmp_path, hf_dir, **extra):
    cfg = tiny_config(dataset, tmp_path / "run", **{"train.init_from": f"hf:{hf_dir}", **extra})
    resolve_vocab(cfg, 258)
    return cfg


def test_saved_checkpoints_are_what_the_cases_claim(hf_dirs):
    files = {kind: sorted(p.name for p in d.iterdir()) for kind, d in hf_dirs.items()}
    assert "model.safetensors" in files["single"]
    assert "model.safetensors.index.json" in files["sharded"]
    assert sum(f.endswith(".safetensors") for f in files["sharded"]) > 2
    assert "lm_head.weight" not in hf_init.HFCheckpoint(hf_dirs["tied"], "tied").files


@pytest.mark.parametrize("kind", ["single", "sharded", "tied"])
def test_tp1_logits_equal_transformers(session, dataset, tmp_path, hf_dirs, kind):
    cfg = init_config(dataset, tmp_path, hf_dirs[kind], **{"model.tie_embeddings": kind == "tied"})
    torch.manual_seed(0)
    model = get_family("mistral").build(cfg.model, cfg.parallel)
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert hf_init.load_into(model, cfg, hf_init.open_checked(cfg)) == len(before)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # all replaced
    ids = input_ids()
    with torch.no_grad():
        ours = model.eval()(ids)
    torch.testing.assert_close(ours, hf_logits(hf_dirs[kind], ids), atol=1e-4, rtol=0)


# One rank of a TP=2 group: build our model, load the checkpoint, gather the vocab-sharded logits.
TP_RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from model import get_family
from pretrain.core import hf_init, parallel
from pretrain.core.config import load_config

cfg = load_config(sys.argv[1])
parallel.setup(cfg)
model = get_family("mistral").build(cfg.model, cfg.parallel).eval()
hf_init.load_into(model, cfg, hf_init.open_checked(cfg))
with torch.no_grad():
    local = model(torch.load(sys.argv[2])).contiguous()
parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
dist.all_gather(parts, local)
if dist.get_rank() == 0:
    torch.save(torch.cat(parts, dim=-1), sys.argv[3])
parallel.teardown()
"""


@pytest.mark.integration
def test_tp2_logits_equal_transformers(dataset, tmp_path, hf_dirs):
    cfg = init_config(dataset, tmp_path, hf_dirs["sharded"], **{"parallel.tp": 2})
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "rank.py").write_text(TP_RANK_SCRIPT)
    ids = input_ids()
    torch.save(ids, tmp_path / "ids.pt")
    result = torchrun(2, [str(tmp_path / "rank.py"), str(tmp_path / "config.yaml"),
                          str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    ours = torch.load(tmp_path / "logits.pt")
    assert ours.shape == (2, 64, TINY["vocab_size"])
    torch.testing.assert_close(ours, hf_logits(hf_dirs["sharded"], ids), atol=1e-4, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.pp": 2}], ids=["tp2", "pp2"])
def test_training_starts_from_the_checkpoint(dataset, tmp_path, hf_dirs, layout):
    """The step-0 validation loss is transformers' loss on the same batches (the loaded weights
    at every rank, the last stage's output layer included), then a few steps train."""
    run_dir = tmp_path / "run"
    extra = {"train.init_from": f"hf:{hf_dirs['single']}", "train.steps": 3, **layout}
    result = torchrun(2, train_cmd(dataset, run_dir, **extra))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"initialized from hf:{hf_dirs['single']}" in result.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    val0 = next(r for r in records if r.get("split") == "val" and r["step"] == 0)
    assert [r["step"] for r in records if "split" not in r] == [1, 2, 3]

    from transformers import MistralForCausalLM

    cfg = load_config(run_dir / "config.yaml")
    hf = MistralForCausalLM.from_pretrained(hf_dirs["single"], attn_implementation="eager",
                                            dtype=torch.float32).eval()
    loader = StreamingLoader(cfg.data.path, "val", cfg.model.seq_length, cfg.train.micro_batch_size,
                             epochs=1)
    losses = []
    with torch.no_grad():
        for _, batch in zip(range(cfg.train.eval_batches), loader):
            logits = hf(batch["input_ids"]).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                          reduction="none"))
    assert val0["loss"] == pytest.approx(torch.cat(losses).double().mean().item(), abs=1e-5)


@pytest.mark.parametrize("override,field", [
    ({"model.num_query_groups": 4}, "num_key_value_heads=2, but model.num_query_groups=4; use --set model.num_query_groups=2"),
    ({"model.ffn_hidden_size": 256}, "intermediate_size=128, but model.ffn_hidden_size=256; use --set model.ffn_hidden_size=128"),
    ({"model.sliding_window": 0}, "sliding_window=32, but model.sliding_window=0; use --set model.sliding_window=32"),
    ({"model.rope_theta": 500000.0}, "rope_theta=10000.0, but model.rope_theta=500000.0; use --set model.rope_theta=10000.0"),
    ({"model.norm_eps": 1e-6}, "rms_norm_eps=1e-05, but model.norm_eps=1e-06; use --set model.norm_eps=1e-05"),
    ({"model.tie_embeddings": True}, "tie_word_embeddings=False, but model.tie_embeddings=True; use --set model.tie_embeddings=false"),
    ({"model.vocab_size": 512}, "vocab_size=384, but model.vocab_size=512; use --set model.vocab_size=384"),
    ({"model.num_layers": 4}, "num_hidden_layers=2, but model.num_layers=4; use --set model.num_layers=2"),
])
def test_a_config_mismatch_names_the_field_and_the_fix(dataset, tmp_path, hf_dirs, override, field):
    cfg = init_config(dataset, tmp_path, hf_dirs["single"], **override)
    with pytest.raises(ConfigError) as err:
        hf_init.open_checked(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"train.init_from=hf:{hf_dirs['single']}: ")
    assert message.endswith(f"config.json has {field}")


def test_checkpoints_that_are_not_this_mistral_are_refused(dataset, tmp_path, hf_dirs):
    def error(hf_dir, **extra) -> str:
        with pytest.raises(ConfigError) as err:
            hf_init.open_checked(init_config(dataset, tmp_path, hf_dir, **extra))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "config.json not found" in error(tmp_path / "absent")
    assert "head_dim=32, but ours is model.hidden_size / model.num_attention_heads = 16" in error(
        save_hf(tmp_path / "wide_heads", head_dim=32))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    assert "model_type='llama'" in error(llama)
    # config.json says this shape, the weights file another (a layer missing)
    partial = save_hf(tmp_path / "partial", num_hidden_layers=1)
    (partial / "config.json").write_text((hf_dirs["single"] / "config.json").read_text())
    assert "lacks tensor model.layers.1.input_layernorm.weight (and 8 more)" in error(partial)
    with pytest.raises(ConfigError, match="must be hf:DIR"):
        tiny_config(dataset, tmp_path / "run", **{"train.init_from": str(hf_dirs["single"])})
    with pytest.raises(ConfigError, match="load into the mistral baseline, not model.name=him"):
        tiny_config(dataset, tmp_path / "run", **{"train.init_from": f"hf:{hf_dirs['single']}",
                                                  "model.name": "him", "model.sliding_window": 0})


@pytest.mark.integration
def test_the_cli_reports_a_mismatch_in_one_line_with_exit_2(dataset, tmp_path, hf_dirs):
    args = train_cmd(dataset, tmp_path / "run", **{"train.init_from": f"hf:{hf_dirs['single']}",
                                                   "model.num_query_groups": 4})
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: train.init_from=hf:{hf_dirs['single']}: config.json has num_key_value_heads=2, "
        "but model.num_query_groups=4; use --set model.num_query_groups=2"]
    assert not (tmp_path / "run").exists()  # nothing started
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 2 and "num_key_value_heads=2" in dry.stderr


@pytest.mark.integration
def test_a_resume_continues_from_its_checkpoint_not_the_hf_weights(dataset, tmp_path, hf_dirs):
    """init_from is read on a fresh start only: the resumed run needs no HF directory any more."""
    import shutil

    hf_dir = shutil.copytree(hf_dirs["single"], tmp_path / "hf")
    run_dir = tmp_path / "run"
    args = train_cmd(dataset, run_dir, **{"train.init_from": f"hf:{hf_dir}", "train.steps": 2})
    first = run_cli(*args)
    assert first.returncode == 0 and "initialized from" in first.stdout, first.stderr[-2000:]
    shutil.rmtree(hf_dir)
    again = run_cli(*args, "--set", "train.steps=3")  # the same command, one step further
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "is not read on a resume" in again.stdout
    assert "initialized from" not in again.stdout
