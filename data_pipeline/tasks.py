"""Synthetic retrieval tasks for any tokenizer, generated offline and deterministic by seed.

- passkey: a number hidden at a chosen depth in filler text; the model must repeat it at the end
  (Mohtashami & Jaggi, 2023). Swept over context length and needle depth.
- MQAR, multi-query associative recall: key=value pairs, then queries of some keys; the model
  must produce each value (Arora et al., 2023, "Zoology"). Swept over pairs and context length.

An example is one token sequence with answer spans; ``score`` teacher-forces it through a model
and counts an answer correct when every answer token is the argmax prediction (equivalent to
greedy decoding of that span).
"""
from __future__ import annotations

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
            examples.append(TaskExample("passkey", ids, [(ids.size - answer.size, answer.size)],
                                        {"context_len": context_len, "depth": depth}))
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


@torch.no_grad()
def score(examples: list[TaskExample], logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``logits_fn(ids [1, n]) -> logits [1, n, vocab]``. Returns overall accuracy (over answer
    spans) and accuracy per setting, keyed 'name=value,...'."""
    correct: dict[str, list[int]] = {}
    for ex in examples:
        ids = torch.from_numpy(ex.input_ids)
        predicted = logits_fn(ids[None, :-1])[0].argmax(-1)  # position p predicts token p + 1
        key = ",".join(f"{k}={v}" for k, v in ex.setting.items())
        for start, length in ex.answers:
            hit = torch.equal(predicted[start - 1:start - 1 + length], ids[start:start + length])
            correct.setdefault(key, []).append(int(hit))
    every = [c for hits in correct.values() for c in hits]
    return {"accuracy": float(np.mean(every)) if every else 0.0, "answers": len(every),
            "by_setting": {k: float(np.mean(v)) for k, v in correct.items()}}
