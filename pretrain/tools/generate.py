"""Sample text from a checkpoint: temperature, top-k and nucleus (top-p) sampling, streamed.

Any checkpoint layout loads: ZeRO and tensor-parallel shards are merged (as `export` does) into
one process. Families that declare incremental decoding (Mistral's and FIM-Mistral's KV caches,
fractal Mamba's recurrence, HIM's KV caches and chunk states) carry their state from token to
token; the others re-run the last ``model.seq_length`` tokens per new token: fine for the small
models this runs on a CPU, quadratic in the context for big ones. Past ``model.seq_length`` the
KV caches restart on the last half window (model/mistral/decode.py).
"""
from __future__ import annotations

import argparse
import codecs
import itertools
import math
import sys
from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import tokenizer_from_manifest
from model import get_family
from pretrain.core.model_dir import CHECKPOINT_HELP, load_model
from pretrain.tools.quantize import quantize_int8


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> int:
    """One id from ``logits [vocab]``; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        cutoff = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def entropy_aware(logits: torch.Tensor, confident: float, uncertain: float, top_k: int) -> tuple[float, int]:
    """(temperature factor, top-k) from the entropy (bits) of the next-token distribution (the
    BSFIN document's sampling): below ``confident`` greedy; above ``uncertain`` the full
    distribution; between, top-k (``top_k``, 40 if unset)."""
    logp = torch.log_softmax(logits.float(), -1)
    bits = float(-(logp.exp() * logp).sum()) / math.log(2)
    if bits < confident:
        return 0.0, 0
    if bits > uncertain:
        return 1.0, 0
    return 1.0, top_k or 40


class Generator:
    """``int8``: dynamic int8 quantization of the linear layers after loading (CPU inference)."""

    def __init__(self, ckpt: str, int8: bool = False):
        self.cfg, self.model = load_model(ckpt)
        data_dir = Path(self.cfg.data.path)
        self.tokenizer = tokenizer_from_manifest(read_manifest(data_dir)["tokenizer"], data_dir)
        self.incremental = get_family(self.cfg.model.name).supports.incremental_decoding
        if int8:
            self.model = quantize_int8(self.model, self.cfg.model)

    def _next_logits(self, ids: list[int]) -> Iterator[torch.Tensor]:
        """Next-token logits after ``ids``, again each time the caller has appended a token.
        Families with incremental decoding carry their state (IncrementalDecoder); the others
        re-run the last ``model.seq_length`` tokens."""
        if self.incremental:
            state = self.model.initial_state(1)
            for token in ids[:-1]:
                _, state = self.model.step(torch.tensor([token]), state)
            fed = len(ids) - 1
            while True:
                logits, state = self.model.step(torch.tensor([ids[fed]]), state)
                fed += 1
                yield logits[0]
        window = self.cfg.model.seq_length
        while True:
            yield self.model(torch.tensor([ids[-window:]]), None)[0, -1]

    @torch.no_grad()
    def stream(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
               top_p: float, seed: int, entropy_bits: tuple[float, float] | None = None) -> Iterator[str]:
        """Yields decoded text pieces as tokens are sampled (UTF-8 split safely). With
        ``entropy_bits`` (confident, uncertain) each token's mode follows its entropy
        (``entropy_aware``): greedy, top-k or the full distribution at ``temperature``."""
        generator = torch.Generator().manual_seed(seed)
        ids = [int(i) for i in self.tokenizer.encode(prompt.encode("utf-8"))] or [self.tokenizer.eos_id]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        emitted, new = b"", []
        logits = self._next_logits(ids)
        for _ in range(max_new_tokens):
            scores = next(logits)[: self.tokenizer.vocab_size]
            if entropy_bits is None:
                token = sample_next(scores, temperature, top_k, top_p, generator)
            else:
                factor, k = entropy_aware(scores, *entropy_bits, top_k)
                token = sample_next(scores, temperature * factor, k, top_p, generator)
            if token == self.tokenizer.eos_id:
                break
            ids.append(token)
            new.append(token)
            text = self.tokenizer.decode(new)
            if text.startswith(emitted):
                piece = decoder.decode(text[len(emitted):])
                emitted = text
                if piece:
                    yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="sample text from a checkpoint, streamed",
                       description="Load a checkpoint (any ZeRO / tensor-parallel layout, merged into "
                                   "one process) and sample a continuation of each prompt.")
    p.add_argument("--ckpt", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--interactive", action="store_true",
                   help="after --prompt (if any), read one prompt per line from stdin until EOF")
    p.add_argument("--max-new-tokens", type=int, default=200, help="default 200")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: smallest set with this probability mass (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--entropy-aware", type=float, nargs=2, metavar=("CONFIDENT", "UNCERTAIN"),
                   help="per token by the entropy (bits) of its distribution: below CONFIDENT greedy, above "
                   "UNCERTAIN the full distribution, between top-k (--top-k, 40 if unset); e.g. 1 4")
    p.add_argument("--int8", action="store_true",
                   help="int8 dynamic quantization of the linear layers (CPU inference)")
    return p


def main(args) -> int:
    if args.prompt is None and not args.interactive:
        args.parser.error("generate needs --prompt TEXT and/or --interactive")
    generator = Generator(args.ckpt, int8=args.int8)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   entropy_bits=tuple(args.entropy_aware) if args.entropy_aware else None)
    prompts = [args.prompt] if args.prompt is not None else []
    if args.interactive:
        print("interactive: one prompt per line, Ctrl-D to quit", file=sys.stderr)
        prompts = itertools.chain(prompts, (line.rstrip("\n") for line in sys.stdin))
    for prompt in prompts:
        sys.stdout.write(prompt)
        for piece in generator.stream(prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
