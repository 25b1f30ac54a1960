"""Sample text from a checkpoint: temperature, top-k and nucleus (top-p) sampling, streamed.

Any checkpoint layout loads: ZeRO and tensor-parallel shards are merged (as `export` does) into
one process. Models with a ``step`` (fractal Mamba's recurrence, HIM's KV caches and chunk states)
carry their state from token to token; the others re-run the last ``model.seq_length`` tokens per
new token (no KV cache yet): fine for the small models this runs on a CPU, quadratic in the
context for big ones.
"""
from __future__ import annotations

import codecs
import itertools
import math
import sys
from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.tokenizer import tokenizer_from_manifest
from data_pipeline.shards import read_manifest

from .config import load_config
from .export import consolidate, locate


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


def load_state(ckpt: str) -> tuple:
    """(run config, whole-model state dict) from a training checkpoint of any layout, or from a
    directory written by `export` / `compress` (model.safetensors + config.yaml)."""
    exported = Path(ckpt) / "model.safetensors"
    if exported.is_file():
        from safetensors.torch import load_file

        return load_config(Path(ckpt) / "config.yaml"), load_file(str(exported))
    ckpt_dir, tag = locate(ckpt)
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    return cfg, consolidate(ckpt_dir, tag, cfg)


def build_single_process(cfg) -> torch.nn.Module:
    """The whole model in this process (no model parallelism, nothing to recompute). Only the
    families built on megatron-core need its parallel state (a gloo group of one); the plain-torch
    ones skip it, and the ~220 MB of resident memory its imports cost."""
    from model import get_family

    from . import parallel

    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = 1, 1, 0
    cfg.parallel.sequence_parallel = cfg.parallel.recompute = False
    family = get_family(cfg.model.name)
    if family.tensor_parallel or family.pipeline_parallel:
        parallel.setup(cfg)
    return family.build(cfg.model, cfg.parallel)


class Generator:
    """``int8``: dynamic int8 quantization of the linear layers after loading (CPU inference)."""

    def __init__(self, ckpt: str, int8: bool = False):
        self.cfg, state = load_state(ckpt)
        data_dir = Path(self.cfg.data.path)
        self.tokenizer = tokenizer_from_manifest(read_manifest(data_dir)["tokenizer"], data_dir)
        self.model = build_single_process(self.cfg)
        own = set(self.model.state_dict())  # export strips the "gpt." prefix of megatron's part
        self.model.load_state_dict({k if k in own else "gpt." + k: v for k, v in state.items()})
        self.model.eval()
        if int8:
            from .compress import quantize_int8
            self.model = quantize_int8(self.model)

    def _next_logits(self, ids: list[int]) -> Iterator[torch.Tensor]:
        """Next-token logits after ``ids``, again each time the caller has appended a token.
        Recurrent models (``step``) carry their state: O(1) per token; the others re-run the
        last ``model.seq_length`` tokens."""
        if hasattr(self.model, "step"):
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


def main(args) -> int:
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
