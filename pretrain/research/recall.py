"""`bench recall`: Zoology's MQAR protocol (Arora et al., 2023) with our attentions as the mixer.

For every mixer (dense causal attention, a sliding window shorter than the sequence, FIM
attention with its branch set or a subset), sequence length, model width, learning rate and seed,
a 2-layer model of our own classes (megatron-core GPTModel built through the registry, whole in
this process) is trained from scratch on freshly generated MQAR batches
(``data_pipeline.tasks.mqar_batch``: Zoology's conventions) with a plain AdamW loop: loss on the
value positions only, no DeepSpeed (one process, nothing to shard). Then accuracy and bits per
answer token are scored on a held-out set (one seeded set per length, the same for every mixer
and seed). Seed s gives every mixer the same training batches. As in Zoology, the reported
point is the learning rate with the best mean held-out accuracy over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.config import ConfigError
from pretrain.bench import provenance
from pretrain.research import stats

FIM_BRANCHES = "local,hierarchical,routed"   # FIM-Mistral's default branch set (model.fim.branches)


@dataclass
class RecallOptions:
    """What `bench recall` trains and scores (its command line, as one object)."""
    mixers: list[str] = field(default_factory=lambda: ["dense", "window", "fim"])
    lengths: list[int] = field(default_factory=lambda: [32, 64, 128])
    widths: list[int] = field(default_factory=lambda: [32, 64])
    seeds: int = 3
    pairs: list[int] = field(default_factory=lambda: [4])   # one for all lengths, or one per length
    steps: int = 600
    batch: int = 64                  # sequences per step (answers per step: batch x pairs)
    lrs: list[float] = field(default_factory=lambda: [3e-3])
    warmup: float = 1 / 3            # fraction of the steps warming up (a slow start helps the
                                     # induction circuit form within few steps)
    vocab: int = 256
    window: int = 16                 # the sliding window (model.sliding_window)
    fim_block: int = 16              # FIM's leaf block (model.fim.block_size); branching 2, top-2
    head_dim: int = 32               # heads = width // head_dim
    ffn_mult: int = 2                # SwiGLU hidden = ffn_mult x width
    eval_examples: int = 512
    threads: int = 1
    out: str = "reports/recall"

    def validate(self) -> None:
        for m in self.mixers:
            kind, _, branches = m.partition(":")
            if kind not in ("dense", "window", "fim") or (branches and kind != "fim"):
                raise ConfigError(f"--mixers: {m!r} is not dense, window, fim or fim:BRANCHES")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup={self.warmup} must be in [0, 1)")
        for name in ("seeds", "steps", "batch", "vocab", "window", "fim_block", "head_dim",
                     "ffn_mult", "eval_examples", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if len(self.pairs) not in (1, len(self.lengths)):
            raise ConfigError(f"--pairs needs one value, or one per length ({len(self.lengths)}), "
                              f"got {len(self.pairs)}")
        for w in self.widths:
            if w % self.head_dim or (self.head_dim % 2):
                raise ConfigError(f"--widths: {w} must be a multiple of --head-dim={self.head_dim} (even)")
        for length, pairs in zip(self.lengths, self.pair_counts()):
            if pairs < 1 or 4 * pairs > length or pairs > self.vocab // 2 - 1:
                raise ConfigError(f"length {length} with {pairs} pairs: need 1 <= pairs <= length / 4 "
                                  f"and pairs < --vocab / 2")

    def pair_counts(self) -> list[int]:
        return list(self.pairs) * len(self.lengths) if len(self.pairs) == 1 else list(self.pairs)


QUICK = {"lengths": [32, 64], "widths": [32], "seeds": 2, "steps": 6, "batch": 8, "window": 16,
         "eval_examples": 32}


def mixer_overrides(mixer: str, o: RecallOptions) -> list[str]:
    """The config keys that make the model's attention this mixer."""
    kind, _, branches = mixer.partition(":")
    if kind == "dense":
        return ["model.name=mistral", "model.sliding_window=0"]
    if kind == "window":
        return ["model.name=mistral", f"model.sliding_window={o.window}"]
    return ["model.name=fim_mistral", "model.sliding_window=0", f"model.fim.block_size={o.fim_block}",
            f"model.fim.branches={branches or FIM_BRANCHES}"]


def point_config(mixer: str, length: int, width: int, o: RecallOptions):
    from pretrain.core.config import load_config

    heads = width // o.head_dim
    return load_config(None, [
        *mixer_overrides(mixer, o), "model.num_layers=2", f"model.hidden_size={width}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={heads}",
        f"model.ffn_hidden_size={o.ffn_mult * width}", f"model.seq_length={length}",
        f"model.vocab_size={o.vocab}", "log.wandb=false", "log.progress=false"])


def attended_keys(mixer: str, length: int, o: RecallOptions) -> int:
    """Keys one query may attend (upper bound, no causal discount): what the mixer can reach."""
    kind = mixer.partition(":")[0]
    if kind == "dense":
        return length
    if kind == "window":
        return min(o.window, length)
    from model.fim_mistral.model import attended_keys as fim_keys

    return fim_keys(point_config(mixer, length, o.head_dim, o).model, 0)


def learning_rate(step: int, steps: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of the steps, then cosine decay to 10%
    of the peak."""
    warmup = max(1, round(steps * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_seed(seed: int, step: int) -> int:
    """The data seed of one training batch: the held-out sets use seed 0, training seeds >= 1M."""
    return (seed + 1) * 1_000_000 + step


def train_point(mixer: str, length: int, pairs: int, width: int, lr: float, seed: int,
                o: RecallOptions, held_out) -> dict:
    import torch

    from data_pipeline.tasks import mqar_batch, value_scores
    from pretrain.core.model_dir import build_single_process

    start = time.time()
    cfg = point_config(mixer, length, width, o)
    torch.manual_seed(seed)
    model = build_single_process(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    for step in range(o.steps):
        batch = mqar_batch(o.batch, length, pairs, o.vocab, seed=train_seed(seed, step))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, o.steps, lr, o.warmup)
        per_token = model(batch.inputs, batch.targets)           # nats [b, s]
        loss = per_token[batch.mask].mean()                       # the value positions only
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(held_out.inputs[i:i + 64]) for i in range(0, len(held_out.inputs), 64)])
    scores = value_scores(logits, held_out)
    return {"mixer": mixer, "length": length, "pairs": pairs, "width": width, "lr": lr, "seed": seed,
            "accuracy": scores["accuracy"], "answer_bits": scores["answer_bits"],
            "answers": scores["answers"], "final_train_loss": loss.item(),
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.time() - start}


def summarize_points(points: list[dict], o: RecallOptions) -> list[dict]:
    """One row per (mixer, length, width): the learning rate with the best mean accuracy over
    seeds (ties: fewer answer bits), and its accuracy and bits over seeds."""
    rows = []
    for mixer in o.mixers:
        for length in o.lengths:
            for width in o.widths:
                candidates = []
                for lr in o.lrs:
                    runs = [p for p in points if (p["mixer"], p["length"], p["width"], p["lr"]) ==
                            (mixer, length, width, lr)]
                    acc = stats.summarize([r["accuracy"] for r in runs])
                    bits = stats.summarize([r["answer_bits"] for r in runs])
                    candidates.append({"mixer": mixer, "length": length, "width": width, "lr": lr,
                                       "pairs": runs[0]["pairs"], "params": runs[0]["params"],
                                       "accuracy": acc, "answer_bits": bits})
                rows.append(max(candidates, key=lambda c: (c["accuracy"]["mean"], -c["answer_bits"]["mean"])))
    return rows


def run(o: RecallOptions, command: str) -> dict:
    import torch

    from data_pipeline.tasks import mqar_batch
    from pretrain.core import parallel
    from pretrain.research.recall_report import write_report

    o.validate()
    torch.set_num_threads(o.threads)
    out_dir = Path(o.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    was_initialized = torch.distributed.is_initialized()
    grid = [(m, length, pairs, w, lr, s) for length, pairs in zip(o.lengths, o.pair_counts())
            for w in o.widths for m in o.mixers for lr in o.lrs for s in range(o.seeds)]
    held_out = {length: mqar_batch(o.eval_examples, length, pairs, o.vocab, seed=0)
                for length, pairs in zip(o.lengths, o.pair_counts())}
    points = []
    try:
        for i, (mixer, length, pairs, width, lr, seed) in enumerate(grid, 1):
            point = train_point(mixer, length, pairs, width, lr, seed, o, held_out[length])
            points.append(point)
            print(f"[{i}/{len(grid)}] {mixer} length {length} ({pairs} pairs) width {width} lr {lr:g} "
                  f"seed {seed}: accuracy {point['accuracy']:.3f}, {point['answer_bits']:.2f} bits/answer "
                  f"({point['seconds']:.1f} s)", flush=True)
    finally:
        if not was_initialized:
            parallel.teardown()
    results = {"benchmark": "recall", "command": command, "commit": provenance.commit(),
               "date": provenance.utc_now(), "hardware": provenance.hardware(), "options": asdict(o),
               "pairs": dict(zip(map(str, o.lengths), o.pair_counts())),
               "attended_keys": {m: {str(n): attended_keys(m, n, o) for n in o.lengths} for m in o.mixers},
               "points": points, "summary": summarize_points(points, o),
               "total_minutes": (time.time() - start) / 60}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out_dir)
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    d = RecallOptions()
    p = sub.add_parser("recall", help="MQAR (Zoology): dense vs window vs FIM attention, trained on the task",
                       description="Trains a 2-layer model per mixer x length x width x lr x seed "
                                   "directly on multi-query associative recall (Zoology's "
                                   "conventions), scores accuracy and bits per answer token on a "
                                   "held-out set, and writes OUT/results.json, OUT/report.md and "
                                   "OUT/recall.png. --quick: a tiny grid in seconds.")
    p.add_argument("--out", default=d.out, help=f"report directory (default {d.out})")
    p.add_argument("--quick", action="store_true",
                   help="tiny grid (lengths 32 64, width 32, 2 seeds, 6 steps): checks the pipeline")
    p.add_argument("--mixers", nargs="+", help="dense, window, fim, fim:BRANCHES (e.g. fim:local,routed); "
                   "default dense window fim")
    p.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {d.lengths})")
    p.add_argument("--widths", type=int, nargs="+", help=f"model widths (default {d.widths})")
    p.add_argument("--seeds", type=int, help=f"seeds per point (default {d.seeds})")
    p.add_argument("--pairs", type=int, nargs="+", help=f"key-value pairs: one for every length or one "
                   f"per length (default {d.pairs}; Zoology scales them as length / 16)")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {d.steps})")
    p.add_argument("--batch", type=int, help=f"sequences per step (default {d.batch})")
    p.add_argument("--lrs", type=float, nargs="+", help=f"learning rates; the best per point is "
                   f"reported (default {d.lrs})")
    p.add_argument("--warmup", type=float, help=f"fraction of the steps warming up the learning rate "
                   f"(default {d.warmup:.2f})")
    p.add_argument("--vocab", type=int, help=f"vocabulary: keys and values split it in halves (default {d.vocab})")
    p.add_argument("--window", type=int, help=f"sliding window of the window mixer (default {d.window})")
    p.add_argument("--fim-block", type=int, help=f"FIM leaf block (default {d.fim_block})")
    p.add_argument("--eval-examples", type=int, help=f"held-out sequences per length (default {d.eval_examples})")
    p.add_argument("--threads", type=int, help=f"torch threads (default {d.threads})")
    return p


def options_from_args(args) -> RecallOptions:
    """Defaults, then --quick's grid, then every flag given explicitly."""
    values = asdict(RecallOptions())
    if args.quick:
        values.update(QUICK)
    for key in values:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    return RecallOptions(**values)


def main(args) -> int:
    results = run(options_from_args(args), args.command)
    print(f"report: {Path(args.out) / 'report.md'} ({results['total_minutes']:.1f} min)")
    return 0
