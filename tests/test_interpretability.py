"""The interpretability proxy: attention of the answer's queries on the passkey needle, for the
baseline's windowed softmax and FIM's explicit weights over tokens and summary units."""
import pytest

from data_pipeline.tasks import passkey_examples
from data_pipeline.tokenizer import ByteTokenizer
from pretrain.research.interpretability import needle_mass

from helpers import build_model

TOK = ByteTokenizer()


@pytest.fixture(params=["mistral", "fim_mistral"])
def model(request, session):
    session.model.name = request.param
    session.model.seq_length = 128
    session.model.fim.block_size = 16
    return build_model(session).eval()


def test_the_needle_mass_is_a_share_of_the_attention(model):
    examples = passkey_examples(TOK, 128, depths=(0.0, 1.0), per_depth=1, seed=0)
    result = needle_mass(model, examples)
    assert 0.0 <= result["needle_mass"] <= 1.0 and len(result["per_layer"]) == 2
    assert all(core.capture is None for core in model.core_attentions())      # capture switched off
    # the whole prompt as the "needle": every weight of every query counts, summaries included
    for ex in examples:
        ex.needle = (0, ex.input_ids.size)
    assert needle_mass(model, examples)["needle_mass"] == pytest.approx(1.0)
    for ex in examples:
        ex.needle = (5, 5)
    assert needle_mass(model, examples)["needle_mass"] == 0.0


def test_a_needle_outside_the_baselines_window_gets_no_attention(session):
    session.model.seq_length = 128                  # the tiny config's window is 32
    model = build_model(session).eval()
    example = passkey_examples(TOK, 128, depths=(0.0,), per_depth=1, seed=0)
    start, end = example[0].needle
    assert example[0].answers[0][0] - 1 - (end - 1) >= 32      # the needle ends out of the window
    assert needle_mass(model, example)["needle_mass"] == 0.0
