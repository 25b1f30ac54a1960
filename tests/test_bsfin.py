"""BSFIN: entropy patching (UTF-8 safe, lossless, causal), complex layers against torch.complex
references, end-to-end causality of the model, an entropy model from a directory, training."""
import math

import pytest
import torch

from data_pipeline import patching
from pretrain.core.config import ConfigError, load_config

from helpers import ROOT, run_cli, train_cmd

TEXT = ("To be, or not to be: naïve café, ünïcödé ✓ 日本語のテキスト, Ελληνικά, русский 🙂🙃 — "
        "end of the line.\n").encode()


def bsfin_config(**extra):
    values = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
              "model.num_query_groups": 4, "model.ffn_hidden_size": 48, "model.seq_length": 96,
              "model.vocab_size": 258, "model.bsfin.local_hidden": 32, "model.bsfin.local_heads": 2,
              "model.bsfin.ngram_buckets": 64, "model.bsfin.max_patch": 6, **extra}
    return load_config(ROOT / "configs" / "bsfin_tiny.yaml", [f"{k}={v}" for k, v in values.items()])


RULES = [patching.PatchRule(0.1, True, 2, 6), patching.PatchRule(2.0, False, 1, 4),
         patching.PatchRule(0.0, False, 1, 1), patching.PatchRule(99.0, False, 1, 5)]


@pytest.mark.parametrize("rule", RULES, ids=["relative", "global", "every-char", "max-size-only"])
def test_patches_reassemble_the_input_and_never_split_a_utf8_character(rule):
    ids = torch.tensor([list(TEXT), list(TEXT[::-1].decode("utf-8", "replace").encode()[:len(TEXT)])])
    starts = patching.patch_starts(ids, patching.window_entropy(ids, 8), rule)
    for row in range(2):
        data = bytes(ids[row].tolist())
        parts = patching.split(data, starts[row])
        assert b"".join(parts) == data
        for part in parts[:-1] if row else parts:          # row 1 was cut mid-character at its end
            part.decode("utf-8")                            # raises if a character was split
        assert all(len(p) <= rule.max_size + 3 for p in parts)
        assert all(len(p) >= rule.min_size for p in parts[1:-1]) or rule.min_size == 1
    found = patching.patches_from_starts(starts)
    assert torch.equal(found.index[:, 1:] - found.index[:, :-1], starts[:, 1:-1].long())
    stats = patching.statistics(found)
    assert 1 <= stats["patch_mean_bytes"] <= rule.max_size + 3


def test_a_boundary_is_decided_by_earlier_bytes_only():
    ids = torch.tensor([list(TEXT)])
    rule = patching.PatchRule(0.1, True, 2, 6)
    full = patching.patch_starts(ids, patching.window_entropy(ids, 8), rule)
    for cut in (5, 17, 40, len(TEXT) - 1):
        prefix = ids[:, :cut]
        assert torch.equal(patching.patch_starts(prefix, patching.window_entropy(prefix, 8), rule), full[:, :cut + 1])
    logits = torch.randn(1, ids.shape[1], 258)
    entropy = patching.model_entropy(logits)
    assert entropy.shape == (1, ids.shape[1] + 1) and entropy[0, 0] == 0
    p = torch.softmax(logits[0, 4], -1)
    assert entropy[0, 5] == pytest.approx(float(-(p * p.log2()).sum()), rel=1e-5)


def test_window_entropy_is_the_shannon_entropy_of_the_preceding_window():
    ids = torch.tensor([[1, 1, 2, 3, 3, 3, 4]])
    h = patching.window_entropy(ids, 4)
    window = [1, 2, 3, 3]                       # the 4 bytes before t = 5
    expected = -sum(c / 4 * math.log2(c / 4) for c in (window.count(v) for v in set(window)))
    assert h[0, 5] == pytest.approx(expected, rel=1e-6) and h[0, 0] == 0 and h[0, 1] == 0


# --- complex layers vs torch.complex references -------------------------------------------------

def _close(got, expected):  # float32 layers against float64 references
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _complex(pair):
    return torch.complex(pair[0].double(), pair[1].double())


def _weight(linear):
    return torch.complex(linear.real.weight.double(), linear.imag.weight.double())


def _ref_linear(layer, z):
    out = z @ _weight(layer).T
    return out + torch.complex(layer.bias[0].double(), layer.bias[1].double()) if layer.bias is not None else out


def _randomize(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 and p.shape[0] > 4 else 0.0))


def _pair(*shape):
    return torch.randn(*shape), torch.randn(*shape)


def test_complex_linear_and_layer_norm_match_torch_complex():
    from model.bsfin.complex_layers import ComplexLayerNorm, ComplexLinear

    torch.manual_seed(0)
    z = _pair(2, 5, 8)
    linear = ComplexLinear(8, 6)
    _randomize(linear)
    _close(_complex(linear(z)), _ref_linear(linear, _complex(z)))
    norm = ComplexLayerNorm(8)
    _randomize(norm)
    c = _complex(z)
    centred = c - c.mean(-1, keepdim=True)
    expected = centred / torch.sqrt((centred.abs() ** 2).mean(-1, keepdim=True) + norm.eps) * norm.gain.double()
    expected = expected + torch.complex(norm.bias[0].double(), norm.bias[1].double())
    _close(_complex(norm(z)), expected)


@pytest.mark.parametrize("mode", ["quantum", "classical"])
def test_interference_attention_matches_torch_complex(mode):
    from model.bsfin.complex_layers import InterferenceAttention, frequencies

    torch.manual_seed(1)
    b, p, d, heads = 2, 7, 12, 3
    attn = InterferenceAttention(d, heads, mode=mode, rope=True, entangle=True)
    _randomize(attn)
    z = _pair(b, p, d)
    allowed = torch.tril(torch.ones(p, p, dtype=torch.bool)).expand(b, -1, -1).clone()
    allowed[1, 4, :3] = False                                   # an extra mask row
    got = _complex(attn(z, allowed))

    c = _complex(z)
    dh = d // heads

    def heads_of(t):
        return t.view(b, p, heads, dh).transpose(1, 2)

    rope = torch.exp(1j * (torch.arange(p)[:, None] * frequencies(dh)).double())
    mix = attn.entangle.double().to(torch.complex128)
    q = torch.einsum("gh,bhpd->bgpd", mix, heads_of(_ref_linear(attn.q, c)) * rope)
    k = torch.einsum("gh,bhpd->bgpd", mix, heads_of(_ref_linear(attn.k, c)) * rope)
    q = q * torch.exp(1j * attn.phase[0].double())[:, None]
    k = k * torch.exp(1j * attn.phase[1].double())[:, None]
    v = heads_of(_ref_linear(attn.v, c))
    inner = q @ k.conj().transpose(-1, -2)                      # sum_j q_j conj(k_j)
    scores = (inner.abs() if mode == "quantum" else inner.real) / math.sqrt(dh)
    weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    out = (weights.to(torch.complex128) @ v).transpose(1, 2).reshape(b, p, d)
    _close(got, _ref_linear(attn.o, out))


def test_complex_feed_forward_and_positions_match_torch_complex():
    from model.bsfin.complex_layers import ComplexFeedForward, ComplexPositionalEncoding, frequencies

    torch.manual_seed(2)
    ffn = ComplexFeedForward(6, 10)
    _randomize(ffn)
    z = _pair(3, 4, 6)
    hidden = _ref_linear(ffn.up, _complex(z))
    activated = torch.complex(torch.nn.functional.silu(hidden.real), torch.nn.functional.silu(hidden.imag))
    _close(_complex(ffn(z)), _ref_linear(ffn.down, activated))
    pos = ComplexPositionalEncoding(6)
    _randomize(pos)
    angle = torch.arange(4)[:, None].double() * (frequencies(6).double() * pos.scale.double())
    _close(_complex(pos(z)), _complex(z) + torch.exp(1j * angle))


# --- the model ------------------------------------------------------------------------------------

def _model(**extra):
    from model.bsfin.model import BsfinLM

    torch.manual_seed(0)
    return BsfinLM(bsfin_config(**extra).model).eval()


def _byte_rows(n):
    rows = [list((TEXT * 2)[i:i + n]) for i in (0, 11)]
    return torch.tensor(rows)


def _assert_causal(model, ids):
    with torch.no_grad():
        base = model(ids)
        for j in (1, 9, 30, 57, ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 97) % 256
            out = model(changed)
            assert torch.equal(out[:, :j], base[:, :j]), f"a prediction before byte {j} changed"
            assert not torch.equal(out[:, j:], base[:, j:])


@pytest.mark.parametrize("extra", [{}, {"model.bsfin.score_mode": "classical", "model.bsfin.relative": False,
                                        "model.bsfin.threshold": 2.5, "model.bsfin.complex_to_real": "magnitude",
                                        "model.bsfin.memory_dim": 48}],
                         ids=["quantum-relative", "classical-global-magnitude"])
def test_a_prediction_depends_only_on_earlier_bytes(extra):
    """Changing byte j changes no prediction at a position before j (logits at i predict byte
    i + 1), while patch boundaries after j move."""
    _assert_causal(_model(**extra), _byte_rows(96))


def test_patches_from_an_entropy_model_loaded_from_a_directory(tmp_path):
    """patching=model: a byte-level model (here a small random HIM, saved as `export` writes
    it) gives the next-byte entropies; it stays out of BSFIN's parameters; causality holds."""
    from safetensors.torch import save_file

    from model.bsfin.model import BsfinLM
    from model.him.model import HimLM
    from pretrain.core.config import save_config
    from pretrain.core.model_dir import load_model

    him = load_config(ROOT / "configs" / "him_tiny.yaml",
                      ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4",
                       "model.num_query_groups=2", "model.ffn_hidden_size=48", "model.vocab_size=258",
                       "model.seq_length=96", "model.him.chunk_size=16", "model.him.reasoning_tokens=4",
                       "model.him.decoder_tokens=4", "model.him.reasoning_every=1"])
    torch.manual_seed(5)
    save_file(HimLM(him.model).state_dict(), str(tmp_path / "model.safetensors"))
    save_config(him, tmp_path / "config.yaml")
    _, entropy_model = load_model(str(tmp_path))
    cfg = bsfin_config(**{"model.bsfin.patching": "model", "model.bsfin.entropy_model": str(tmp_path),
                          "model.bsfin.threshold": 7.9}).model
    torch.manual_seed(0)
    model = BsfinLM(cfg).eval()
    plain = sum(p.numel() for p in model.parameters())
    model.attach_entropy_model(entropy_model)
    assert sum(p.numel() for p in model.parameters()) == plain
    assert not any(k.startswith("entropy") for k in model.state_dict())
    ids = _byte_rows(96)
    found, starts = model.patches(ids)
    expected = patching.patch_starts(ids, patching.model_entropy(entropy_model(ids)), model.rule)
    assert torch.equal(starts, expected) and 1 < float(found.count.float().mean()) < 96
    _assert_causal(model, ids)
    with pytest.raises(ConfigError, match="entropy_model"):
        bsfin_config(**{"model.bsfin.patching": "model"})


def test_the_tiny_config_matches_the_baselines_size():
    from model import get_family

    base = load_config(ROOT / "configs" / "mistral_tiny.yaml", ["model.vocab_size=384"]).model
    ours = load_config(ROOT / "configs" / "bsfin_tiny.yaml", ["model.vocab_size=384"]).model
    ratio = get_family("bsfin").parameter_count(ours) / get_family("mistral").parameter_count(base)
    assert abs(ratio - 1) < 0.02
    from model.bsfin.model import BsfinLM
    assert get_family("bsfin").parameter_count(ours) == sum(p.numel() for p in BsfinLM(ours).parameters())


# --- generation and continual learning --------------------------------------------------------------

def test_entropy_aware_sampling_picks_greedy_top_k_or_full_by_entropy():
    from pretrain.tools.generate import entropy_aware

    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0])                      # ~0.01 bits
    flat = torch.zeros(64)                                             # 6 bits
    middle = torch.tensor([2.0, 2.0, 2.0, 2.0, -9.0, -9.0])            # ~2 bits
    assert entropy_aware(peaked, 1.0, 4.0, 0) == (0.0, 0)
    assert entropy_aware(flat, 1.0, 4.0, 0) == (1.0, 0)
    assert entropy_aware(middle, 1.0, 4.0, 3) == (1.0, 3) and entropy_aware(middle, 1.0, 4.0, 0) == (1.0, 40)


def test_hash_memory_importance_bounds_eviction_and_state():
    from pretrain.research.continual import HashMemory, token_weights

    memory = HashMemory(capacity=3, decay=0.9, visit_decay=0.5)
    assert memory.visit("a", 1) == 1.0                                 # new: full weight
    assert memory.visit("a", 1) == pytest.approx(0.5)                  # a repeat teaches less
    assert memory.visit("a", 3) == pytest.approx(0.25 * 0.9 ** 2)      # and an older one too
    for key in "bcd":
        memory.visit(key, 4)
    assert "a" not in memory.entries and memory.evictions == 1        # least recently used out
    restored = HashMemory.from_state(memory.state_dict())
    assert restored.state_dict() == memory.state_dict()
    weights = token_weights(HashMemory(10, 1.0, 0.01), [1, 2, 3, 1, 2, 3, 1], span=3, step=0)
    assert weights == [1.0] * 3 + [0.1] * 3 + [1.0]                   # clamped to [0.1, 1]


@pytest.mark.integration
def test_bsfin_trains_logs_patches_and_learns_a_stream_continually(dataset, tmp_path):
    """The trainer runs bsfin (patch statistics in metrics.jsonl). Then continual learning: the
    new stream's held-out end's bpb drops; the original validation bpb is measured before and
    after; the memory is saved and resumed."""
    import json

    from pretrain.core.metrics import read_metrics

    extra = {"model.name": "bsfin", "model.sliding_window": 0, "model.num_query_groups": 4,
             "model.bsfin.local_hidden": 32, "model.bsfin.local_heads": 2, "model.bsfin.ngram_buckets": 64,
             "train.steps": 10, "optim.lr": 3e-3}
    run_dir = tmp_path / "run"
    done = run_cli(*train_cmd(dataset, run_dir, **extra))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(2 <= r["patch_mean_bytes"] <= 12 + 3 for r in rows)
    stream = tmp_path / "stream.txt"
    stream.write_text("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 60)
    def continual(ckpt, out):
        return run_cli("-m", "pretrain", "continual", "--ckpt", str(ckpt), "--stream", str(stream), "--out", str(out),
                       "--lr", "3e-3", "--batch", "4", "--hash-span", "16", "--eval-batches", "2")

    out = tmp_path / "continual"
    first = continual(run_dir, out)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((out / "continual.json").read_text())
    assert result["stream_bpb_after"] < result["stream_bpb_before"] - 0.5
    assert math.isfinite(result["forgetting_bpb"]) and not result["memory_resumed"]
    assert result["memory_summary"]["hits"] > 0 and 0.1 <= result["mean_gradient_scale"] < 1.0
    assert "forgetting" in (out / "report.md").read_text()
    again = continual(out, tmp_path / "c2")             # from the continual output: its memory resumes
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "c2" / "continual.json").read_text())
    assert resumed["memory_resumed"] and resumed["mean_gradient_scale"] < result["mean_gradient_scale"]
