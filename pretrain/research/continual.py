"""`python -m pretrain continual`: online learning on a text stream with a hash-indexed memory
(the BSFIN document's LIVEBSFIN), for any family.

The stream is tokenized with the checkpoint's tokenizer and read once, in order, as windows of
``seq_length`` tokens (its last ``--holdout`` fraction is kept apart to measure the adaptation).
Every ``--hash-span`` tokens of a window form a context, hashed (blake2b) into a bounded memory
of (last access step, frequency, importance); the least recently used entry is evicted when it
is full. A context not in memory has importance 1 (new data is learned at full rate); each visit
multiplies its importance by ``--visit-decay`` (repeats teach less), and every step all
importances decay by ``--decay`` per step since their last access (older data teaches less).
The per-token loss is weighted by its context's importance clamped to [0.1, 1.0] (the design's
gradient scale), so each context's gradient is scaled by it. The memory is saved with the model
(``memory.json``) and picked up again by a later `continual --ckpt OUT`.

Reported (``continual.json``, ``report.md``): bpb on the held-out end of the stream before and
after (adaptation) and on the original validation split before and after (forgetting).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.core.model_dir import CHECKPOINT_HELP

MEMORY_FILE = "memory.json"


@dataclass
class Entry:
    last_access: int
    frequency: int
    importance: float


class HashMemory:
    """Bounded context memory, least recently used first out."""

    def __init__(self, capacity: int, decay: float, visit_decay: float):
        if capacity < 1 or not 0 < decay <= 1 or not 0 < visit_decay <= 1:
            raise ValueError("memory: capacity >= 1, decay and visit decay in (0, 1]")
        self.capacity, self.decay, self.visit_decay = capacity, decay, visit_decay
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self.clock = 0                       # steps seen, across runs that resume this memory

    @staticmethod
    def key(tokens: list[int]) -> str:
        return hashlib.blake2b(json.dumps(tokens).encode(), digest_size=12).hexdigest()

    def visit(self, key: str, step: int) -> float:
        """The context's importance now (before this visit counts), then record the visit."""
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            importance = 1.0
            entry = Entry(step, 0, 1.0)
            if len(self.entries) >= self.capacity:
                self.entries.popitem(last=False)
                self.evictions += 1
        else:
            self.hits += 1
            importance = entry.importance * self.decay ** (step - entry.last_access)
        self.entries[key] = Entry(step, entry.frequency + 1, importance * self.visit_decay)
        self.entries.move_to_end(key)
        return importance

    def summary(self) -> dict:
        values = [e.importance for e in self.entries.values()]
        return {"entries": len(self.entries), "capacity": self.capacity, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "mean_importance": sum(values) / len(values) if values else None}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "decay": self.decay, "visit_decay": self.visit_decay,
                "clock": self.clock, "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "entries": [[k, asdict(e)] for k, e in self.entries.items()]}

    @classmethod
    def from_state(cls, state: dict) -> "HashMemory":
        memory = cls(state["capacity"], state["decay"], state["visit_decay"])
        memory.entries = OrderedDict((k, Entry(**e)) for k, e in state["entries"])
        memory.hits, memory.misses, memory.evictions = state["hits"], state["misses"], state["evictions"]
        memory.clock = state["clock"]
        return memory


def token_weights(memory: HashMemory, window: list[int], span: int, step: int) -> list[float]:
    """Per token of ``window``: its context's importance clamped to [0.1, 1]."""
    weights = []
    for start in range(0, len(window), span):
        chunk = window[start:start + span]
        weights += [min(max(memory.visit(HashMemory.key(chunk), step), 0.1), 1.0)] * len(chunk)
    return weights


def stream_windows(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive windows of ``length + 1`` tokens (inputs and next-token labels), overlapping
    by one token so that every token is predicted once."""
    return [ids[i:i + length + 1] for i in range(0, len(ids) - length, length)]


@torch.no_grad()
def windows_bpb(model, windows: list[list[int]], bytes_per_token: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    nll = nbytes = 0.0
    for i in range(0, len(windows), batch):
        t = torch.tensor(windows[i:i + batch])
        nll += float(model(t[:, :-1], t[:, 1:]).double().sum())
        nbytes += float(bytes_per_token[t[:, 1:]].sum())
    model.train(was_training)
    return nll / math.log(2) / max(nbytes, 1.0)


@dataclass
class ContinualOptions:
    """How `continual` learns from the stream (its command line, as one object)."""
    lr: float = 1e-4                   # AdamW
    batch: int = 8                     # windows per step
    holdout: float = 0.1               # fraction of the stream's windows held out, at its end
    span: int = 32                     # tokens per hashed context
    capacity: int = 65536              # contexts the memory holds
    decay: float = 0.999               # importance decay per step since last access
    visit_decay: float = 0.5           # importance factor per visit
    eval_batches: int = 8              # original validation batches per bpb
    use_memory: bool = True            # False: every token at full weight (the control)
    seed: int = 0


def run(ckpt: str, stream: str, out: str, options: ContinualOptions = ContinualOptions(), log=print) -> dict:
    from tqdm import tqdm

    from pretrain.core.evaluation import val_bpb
    from pretrain.core.model_dir import save_model_dir
    from pretrain.tools.generate import Generator

    o = options
    lr, batch, holdout, span, capacity, decay = o.lr, o.batch, o.holdout, o.span, o.capacity, o.decay
    visit_decay, eval_batches, use_memory, seed = o.visit_decay, o.eval_batches, o.use_memory, o.seed
    if not 0 < holdout < 1 or batch < 1 or span < 1:
        raise ValueError("--holdout in (0, 1), --batch and --hash-span >= 1")
    data = Path(stream).read_bytes()
    torch.manual_seed(seed)
    gen = Generator(ckpt)
    model, cfg, tok = gen.model, gen.cfg, gen.tokenizer
    ids = [int(i) for i in tok.encode(data)]
    windows = stream_windows(ids, cfg.model.seq_length)
    n_hold = max(1, round(len(windows) * holdout))
    if len(windows) - n_hold < 1:
        raise ValueError(f"{stream}: {len(ids)} tokens make {len(windows)} windows of {cfg.model.seq_length + 1}; "
                         "need at least 2 (a longer stream or a smaller --holdout)")
    train, held = windows[:-n_hold], windows[-n_hold:]
    saved = Path(ckpt) / MEMORY_FILE
    memory = HashMemory.from_state(json.loads(saved.read_text())) if saved.is_file() else \
        HashMemory(capacity, decay, visit_decay)
    bytes_per_token = torch.as_tensor(tok.bytes_per_token, dtype=torch.float64)
    result = {"ckpt": ckpt, "stream": stream, "stream_tokens": len(ids), "train_windows": len(train),
              "holdout_windows": len(held), "lr": lr, "batch": batch, "hash_span": span, "memory": use_memory,
              "memory_resumed": saved.is_file(),
              "stream_bpb_before": windows_bpb(model, held, bytes_per_token, batch),
              "val_bpb_before": val_bpb(model, cfg, eval_batches)["bpb"]}
    log(f"before: stream held-out bpb {result['stream_bpb_before']:.4f}, original val bpb {result['val_bpb_before']:.4f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, weights_seen, losses = time.time(), [], []
    steps = range(0, len(train), batch)
    for i in tqdm(steps, desc="continual", unit="step", disable=None):
        chunk = torch.tensor(train[i:i + batch])
        memory.clock += 1
        if use_memory:
            w = torch.tensor([token_weights(memory, row[:-1], span, memory.clock) for row in chunk.tolist()])
        else:
            w = torch.ones(chunk.shape[0], chunk.shape[1] - 1)
        per_token = model(chunk[:, :-1], chunk[:, 1:]).float()
        loss = (per_token * w).sum() / w.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        weights_seen.append(float(w.mean()))
        losses.append(float(per_token.detach().mean()))
    model.eval()
    result.update({"steps": len(steps), "seconds": time.time() - start, "mean_gradient_scale": sum(weights_seen) / len(weights_seen),
                   "first_step_loss": losses[0], "last_step_loss": losses[-1],
                   "stream_bpb_after": windows_bpb(model, held, bytes_per_token, batch),
                   "val_bpb_after": val_bpb(model, cfg, eval_batches)["bpb"], "memory_summary": memory.summary()})
    result["adaptation_bpb"] = result["stream_bpb_after"] - result["stream_bpb_before"]
    result["forgetting_bpb"] = result["val_bpb_after"] - result["val_bpb_before"]
    log(f"after {len(steps)} steps: stream held-out bpb {result['stream_bpb_after']:.4f} "
        f"({result['adaptation_bpb']:+.4f}), original val bpb {result['val_bpb_after']:.4f} ({result['forgetting_bpb']:+.4f})")
    out_dir = save_model_dir(out, model.state_dict(), cfg, ckpt)
    (out_dir / MEMORY_FILE).write_text(json.dumps(memory.state_dict()))
    (out_dir / "continual.json").write_text(json.dumps(result, indent=2))
    (out_dir / "report.md").write_text(render(result))
    return result


def render(r: dict) -> str:
    m = r["memory_summary"]
    return "\n".join([
        f"# Continual learning on `{r['stream']}`", "",
        f"From `{r['ckpt']}`: {r['train_windows']} windows learned online ({r['steps']} steps of {r['batch']}, "
        f"AdamW lr {r['lr']}), {r['holdout_windows']} held out; hash memory "
        + (f"on (contexts of {r['hash_span']} tokens; mean gradient scale {r['mean_gradient_scale']:.3f}; "
           f"{m['entries']} entries, {m['hits']} hits, {m['misses']} misses, {m['evictions']} evictions"
           f"{', resumed' if r['memory_resumed'] else ''})" if r["memory"] else "off (every token at full weight)") + ".", "",
        "| bpb | before | after | change |", "|---|---|---|---|",
        f"| stream, held-out end (adaptation) | {r['stream_bpb_before']:.4f} | {r['stream_bpb_after']:.4f} | "
        f"{r['adaptation_bpb']:+.4f} |",
        f"| original validation split (forgetting) | {r['val_bpb_before']:.4f} | {r['val_bpb_after']:.4f} | "
        f"{r['forgetting_bpb']:+.4f} |", ""])


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("continual", help="online learning on a text stream with a hash-indexed memory (LIVEBSFIN)",
                       description="Reads --stream once, in order, in windows of the model's seq_length; each "
                       "context of --hash-span tokens gets an importance from a bounded hash memory (new: 1; "
                       "decayed per visit and per step since its last access) that scales its gradient within "
                       "[0.1, 1]. Reports bpb on the stream's held-out end and on the original validation split, "
                       "before and after. Writes OUT/model.safetensors, config.yaml, memory.json, continual.json, "
                       "report.md; `continual --ckpt OUT` resumes the memory.")
    p.add_argument("--ckpt", required=True, help=CHECKPOINT_HELP + ", or an export/compress/continual directory")
    p.add_argument("--stream", required=True, help="text file to learn from")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of the stream's windows held out, at its end (default 0.1)")
    p.add_argument("--hash-span", type=int, default=32, help="tokens per hashed context (default 32)")
    p.add_argument("--memory-size", type=int, default=65536, help="contexts the memory holds (default 65536)")
    p.add_argument("--decay", type=float, default=0.999, help="importance decay per step since last access (default 0.999)")
    p.add_argument("--visit-decay", type=float, default=0.5, help="importance factor per visit (default 0.5)")
    p.add_argument("--no-memory", action="store_true", help="every token at full weight (the control)")
    p.add_argument("--eval-batches", type=int, default=8, help="original validation batches per bpb (default 8)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args) -> int:
    options = ContinualOptions(args.lr, args.batch, args.holdout, args.hash_span, args.memory_size, args.decay,
                               args.visit_decay, args.eval_batches, not args.no_memory, args.seed)
    result = run(args.ckpt, args.stream, args.out, options)
    print(f"report: {Path(args.out) / 'report.md'} (adaptation {result['adaptation_bpb']:+.4f} bpb, "
          f"forgetting {result['forgetting_bpb']:+.4f} bpb)")
    return 0
