import numpy as np
import pytest
import torch

from data_pipeline.tasks import mqar_examples, passkey_examples, score
from data_pipeline.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def oracle(examples):
    """logits_fn that knows each sequence: one-hot on the true next token."""
    table = {tuple(ex.input_ids[:-1].tolist()): ex.input_ids for ex in examples}

    def logits_fn(ids):
        full = torch.from_numpy(table[tuple(ids[0].tolist())])
        return torch.nn.functional.one_hot(full[1:], TOK.vocab_size).float()[None]
    return logits_fn


def test_passkey_is_deterministic_and_answerable():
    a = passkey_examples(TOK, 1024, depths=(0.0, 0.5, 1.0), per_depth=2, seed=1)
    b = passkey_examples(TOK, 1024, depths=(0.0, 0.5, 1.0), per_depth=2, seed=1)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not np.array_equal(a[0].input_ids, passkey_examples(TOK, 1024, seed=2)[0].input_ids)
    for ex in a:
        text = TOK.decode(ex.input_ids).decode()
        start, length = ex.answers[0]
        key = TOK.decode(ex.input_ids[start:start + length]).decode()
        assert text.endswith(f"The pass key is {key}") and f"The pass key is {key}. Remember" in text
        assert 1024 - 100 < ex.input_ids.size <= 1024
    # The needle moves with depth.
    positions = [TOK.decode(ex.input_ids).decode().index("Remember") for ex in a[::2]]
    assert positions == sorted(positions) and positions[0] < positions[-1]


def test_mqar_queries_ask_for_stored_values():
    examples = mqar_examples(TOK, num_pairs=8, context_len=512, num_examples=3, seed=0)
    for ex in examples:
        text = TOK.decode(ex.input_ids).decode()
        pairs = dict(p.split("=") for p in text.split("Queries:")[0].removeprefix("Pairs: ").split("; ")
                     if "=" in p)
        assert len(pairs) == 8 and len(ex.answers) == 8
        for start, length in ex.answers:
            value = TOK.decode(ex.input_ids[start:start + length]).decode()
            key = TOK.decode(ex.input_ids[start - 5:start - 1]).decode()
            assert pairs[key] == value
        assert ex.input_ids.size <= 512 + 100


def test_score_oracle_is_perfect_and_chance_is_not():
    examples = passkey_examples(TOK, 512, per_depth=2) + mqar_examples(TOK, 4, 256, num_examples=2)
    result = score(examples, oracle(examples))
    assert result["accuracy"] == 1.0 and result["answers"] == 10 + 8
    assert set(result["by_setting"]) >= {"context_len=512,depth=0.0", "num_pairs=4,context_len=256"}
    g = torch.Generator().manual_seed(0)
    noise = score(examples, lambda ids: torch.randn(1, ids.shape[1], TOK.vocab_size, generator=g))
    assert noise["accuracy"] < 0.2


def test_context_too_short_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        passkey_examples(TOK, 20)
