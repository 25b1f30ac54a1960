import pytest
import torch

from data_pipeline.loader import StreamingLoader
from model import get_family
from pretrain.core.config import load_config
from pretrain.core.metrics import read_metrics

from helpers import run_cli, torchrun, train_cmd


@pytest.fixture(scope="module")
def tp2_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2")
    result = torchrun(2, train_cmd(dataset, run_dir, **{"parallel.tp": 2, "train.steps": 4}))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return run_dir


def export(run_dir, out, fmt):
    result = run_cli("-m", "pretrain", "export", "--ckpt", str(run_dir), "--out", str(out), "--format", fmt)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def our_model(export_dir):
    """The merged weights in our own model at TP=1 (the session fixture set up one process)."""
    from safetensors.torch import load_file

    cfg = load_config(export_dir / "config.yaml")
    cfg.parallel.tp = 1
    torch.manual_seed(0)
    model = get_family("mistral").build(cfg.model, cfg.parallel)
    model.load_state_dict({"gpt." + k: v for k, v in load_file(export_dir / "model.safetensors").items()})
    return cfg, model.eval()


@pytest.mark.integration
def test_merged_tp_shards_reproduce_the_tp2_validation_loss(session, tp2_run, tmp_path):
    cfg, model = our_model(export(tp2_run, tmp_path / "st", "safetensors"))
    loader = StreamingLoader(cfg.data.path, "val", cfg.model.seq_length, cfg.train.micro_batch_size,
                             epochs=1)
    losses = []
    with torch.no_grad():
        for _, batch in zip(range(cfg.train.eval_batches), loader):
            losses.append(model(batch["input_ids"], batch["labels"]).double())
    final_val = [r for r in read_metrics(tp2_run / "metrics.jsonl") if r.get("split") == "val"][-1]
    assert torch.cat(losses).mean().item() == pytest.approx(final_val["loss"], abs=1e-5)


@pytest.mark.integration
def test_tp2_checkpoint_exports_to_transformers_with_equal_logits(session, tp2_run, tmp_path):
    from transformers import MistralForCausalLM

    hf_dir = export(tp2_run, tmp_path / "hf", "hf")
    _, ours = our_model(export(tp2_run, tmp_path / "st", "safetensors"))
    hf = MistralForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                            dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids, None)
        got = hf(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_sampling_rules():
    from pretrain.tools.generate import sample_next

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    assert sample_next(logits, 0.0, 0, 1.0, g) == 1                      # greedy
    assert {sample_next(logits, 1.0, 1, 1.0, g) for _ in range(20)} == {1}  # top-k 1
    assert {sample_next(logits, 1.0, 2, 1.0, g) for _ in range(50)} == {1, 2}
    probs = torch.softmax(logits, -1)  # top-p: the smallest set whose mass reaches p
    p = float(probs[1] + probs[2]) - 1e-3
    assert {sample_next(logits, 1.0, 0, p, g) for _ in range(50)} == {1, 2}
    assert len({sample_next(logits, 1.0, 0, 1.0, g) for _ in range(300)}) == 5


@pytest.mark.integration
def test_generate_streams_a_deterministic_continuation(tp2_run):
    args = ["-m", "pretrain", "generate", "--ckpt", str(tp2_run), "--prompt", "To be",
            "--max-new-tokens", "24", "--temperature", "0"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("To be") and len(first.stdout) > len("To be\n")
    assert first.stdout == second.stdout  # greedy: same text
    sampled = run_cli(*args[:-2], "--temperature", "1.0", "--top-k", "20", "--seed", "3",
                      "--interactive", input="Whether\n")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    lines = sampled.stdout.splitlines()
    assert lines[0].startswith("To be") and any(line.startswith("Whether") for line in lines[1:])
    missing = run_cli("-m", "pretrain", "generate", "--ckpt", str(tp2_run))
    assert missing.returncode == 2 and "--prompt" in missing.stderr
