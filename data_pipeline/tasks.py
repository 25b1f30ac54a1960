"""Synthetic retrieval tasks for any tokenizer, generated offline and deterministic by seed.

- passkey: a number hidden at a chosen depth in filler text; the model must repeat it at the end
  (Mohtashami & Jaggi, 2023). Swept over context length and needle depth.
- MQAR, multi-query associative recall: key=value pairs, then queries of some keys; the model
  must produce each value (Arora et al., 2023, "Zoology"). Swept over pairs and context length.

An example is one token sequence with answer spans; ``score`` teacher-forces it through a model
and counts an answer correct when every answer token is the argmax prediction (equivalent to
greedy decoding of that span), and gives the answer's log-likelihood in bits per answer token
(which moves before accuracy does).

``mqar_batch`` is MQAR in Zoology's own token-level form, for training small models on the task
directly (`bench recall`); ``value_scores`` scores its value positions.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class TaskExample:
    task: str
    input_ids: np.ndarray                    # the whole sequence, answers included
    answers: list[tuple[int, int]]           # (start, length) spans inside input_ids
    setting: dict = field(default_factory=dict)
    needle: tuple[int, int] | None = None     # passkey: the [start, end) span stating the key


def _ids(tokenizer, text: str) -> np.ndarray:
    return tokenizer.encode(text.encode("utf-8")).astype(np.int64)


def passkey_examples(tokenizer, context_len: int, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                     per_depth: int = 5, seed: int = 0) -> list[TaskExample]:
    rng = np.random.default_rng([seed, context_len])
    filler = _ids(tokenizer, FILLER)
    question = _ids(tokenizer, "What is the pass key? The pass key is ")
    examples = []
    for depth in depths:
        for _ in range(per_depth):
            key = str(int(rng.integers(10000, 100000)))
            needle = _ids(tokenizer, f"The pass key is {key}. Remember it. {key} is the pass key. ")
            answer = _ids(tokenizer, key)
            room = context_len - needle.size - question.size - answer.size
            if room < 0:
                raise ValueError(f"passkey: context_len={context_len} is too short for the prompt")
            repeats = room // filler.size
            before = int(round(depth * repeats))
            ids = np.concatenate([np.tile(filler, before), needle, np.tile(filler, repeats - before),
                                  question, answer])
            start = before * filler.size
            examples.append(TaskExample("passkey", ids, [(ids.size - answer.size, answer.size)],
                                        {"context_len": context_len, "depth": depth},
                                        needle=(start, start + needle.size)))
    return examples


def mqar_examples(tokenizer, num_pairs: int, context_len: int, num_examples: int = 10,
                  num_queries: int | None = None, seed: int = 0) -> list[TaskExample]:
    """Pairs 'abcd=1234; ...', filler up to context_len, then 'Queries: efgh=5678; ...'."""
    rng = np.random.default_rng([seed, num_pairs, context_len])
    letters = np.array(list(string.ascii_lowercase))
    num_queries = num_queries or num_pairs
    filler = _ids(tokenizer, FILLER)
    examples = []
    for _ in range(num_examples):
        keys: list[str] = []
        while len(keys) < num_pairs:
            k = "".join(rng.choice(letters, 4))
            if k not in keys:
                keys.append(k)
        values = [str(int(v)) for v in rng.integers(1000, 10000, num_pairs)]
        parts = [_ids(tokenizer, "Pairs: ")]
        for k, v in zip(keys, values):
            parts.append(_ids(tokenizer, f"{k}={v}; "))
        queries = [int(i) for i in rng.choice(num_pairs, num_queries, replace=num_queries > num_pairs)]
        tail, spans, offset = [_ids(tokenizer, "Queries: ")], [], 0
        offset += tail[0].size
        for q in queries:
            prompt, answer, sep = _ids(tokenizer, f"{keys[q]}="), _ids(tokenizer, values[q]), _ids(tokenizer, "; ")
            tail += [prompt, answer, sep]
            spans.append((offset + prompt.size, answer.size))
            offset += prompt.size + answer.size + sep.size
        head = np.concatenate(parts)
        room = context_len - head.size - offset
        pad = np.tile(filler, max(room, 0) // filler.size)
        ids = np.concatenate([head, pad, *tail])
        start = head.size + pad.size
        examples.append(TaskExample("mqar", ids, [(start + s, n) for s, n in spans],
                                    {"num_pairs": num_pairs, "context_len": context_len}))
    return examples


def answer_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log2 p(target) of each answer token: logits ``[..., vocab]``, targets ``[...]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0] / math.log(2)


@torch.no_grad()
def score(examples: list[TaskExample], logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``logits_fn(ids [1, n]) -> logits [1, n, vocab]``. Returns overall accuracy (over answer
    spans), bits per answer token (mean -log2 p over every answer token) and both per setting,
    keyed 'name=value,...'."""
    correct: dict[str, list[int]] = {}
    bits: dict[str, list[float]] = {}
    for ex in examples:
        ids = torch.from_numpy(ex.input_ids)
        logits = logits_fn(ids[None, :-1])[0]                 # position p predicts token p + 1
        predicted = logits.argmax(-1)
        key = ",".join(f"{k}={v}" for k, v in ex.setting.items())
        for start, length in ex.answers:
            span = slice(start - 1, start - 1 + length)
            hit = torch.equal(predicted[span], ids[start:start + length])
            correct.setdefault(key, []).append(int(hit))
            bits.setdefault(key, []).extend(answer_bits(logits[span], ids[start:start + length]).tolist())
    every = [c for hits in correct.values() for c in hits]
    every_bits = [b for values in bits.values() for b in values]
    return {"accuracy": float(np.mean(every)) if every else 0.0, "answers": len(every),
            "answer_bits": float(np.mean(every_bits)) if every_bits else 0.0,
            "by_setting": {k: float(np.mean(v)) for k, v in correct.items()},
            "bits_by_setting": {k: float(np.mean(v)) for k, v in bits.items()}}


@dataclass
class MqarBatch:
    """Zoology's MQAR as tensors: ``inputs [b, s]``; at each query position (``mask`` True) the
    model must predict ``targets`` there, the queried key's value (0 elsewhere)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def mqar_batch(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int,
               power_a: float = 0.01, random_non_queries: bool = False) -> MqarBatch:
    """Zoology's ``multiquery_ar`` (Arora et al., 2023): keys from ``[1, vocab/2)``, values from
    ``[vocab/2, vocab)``; ``k1 v1 ... kP vP`` first, then every key queried once at an even
    offset ``2 g`` of the rest, gaps g drawn without replacement with p(g) ~ (g + 1)^(a - 1) (near
    queries likelier); every other position is 0 (Zoology's figure 2), or with
    ``random_non_queries`` a uniform random token; neither is ever supervised. The value is never
    shown after its query: it is only the target there."""
    context = 2 * num_pairs
    space = (seq_len - context) // 2
    if space < num_pairs:
        raise ValueError(f"mqar_batch: seq_len={seq_len} needs >= 4 x num_pairs={num_pairs} tokens")
    half = vocab_size // 2
    if half - 1 < num_pairs:
        raise ValueError(f"mqar_batch: vocab_size={vocab_size} has fewer than {num_pairs} keys")
    rng = np.random.default_rng([seed, seq_len, num_pairs, vocab_size])
    rows = np.arange(num_examples)[:, None]
    # Distinct keys and values per row: the first P of a random permutation of each half.
    keys = rng.random((num_examples, half - 1)).argsort(axis=1)[:, :num_pairs] + 1
    values = rng.random((num_examples, vocab_size - half)).argsort(axis=1)[:, :num_pairs] + half
    # Weighted sampling without replacement as the top-P of log p + Gumbel noise (Gumbel-top-k).
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(num_examples, space))), axis=1)[:, :num_pairs]
    inputs = (rng.integers(0, vocab_size, (num_examples, seq_len)) if random_non_queries
              else np.zeros((num_examples, seq_len), dtype=np.int64))
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    where = context + 2 * gaps
    inputs[rows, where] = keys
    targets = np.zeros((num_examples, seq_len), dtype=np.int64)
    targets[rows, where] = values
    mask = np.zeros((num_examples, seq_len), dtype=bool)
    mask[rows, where] = True
    return MqarBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask))


@torch.no_grad()
def value_scores(logits: torch.Tensor, batch: MqarBatch) -> dict:
    """Accuracy (argmax = value) and bits per answer token over the value positions only."""
    chosen = logits[batch.mask]                                  # [answers, vocab]
    truth = batch.targets[batch.mask]
    return {"accuracy": float((chosen.argmax(-1) == truth).float().mean()),
            "answer_bits": float(answer_bits(chosen, truth).mean()), "answers": int(truth.numel())}
