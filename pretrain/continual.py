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

import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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


def run(ckpt: str, stream: str, out: str, lr: float, batch: int, holdout: float, span: int, capacity: int,
        decay: float, visit_decay: float, eval_batches: int, use_memory: bool, seed: int, log=print) -> dict:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .compress import val_bpb
    from .config import save_config
    from .generate import Generator

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
              "val_bpb_before": val_bpb(model, cfg, eval_batches)}
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
                   "val_bpb_after": val_bpb(model, cfg, eval_batches), "memory_summary": memory.summary()})
    result["adaptation_bpb"] = result["stream_bpb_after"] - result["stream_bpb_before"]
    result["forgetting_bpb"] = result["val_bpb_after"] - result["val_bpb_before"]
    log(f"after {len(steps)} steps: stream held-out bpb {result['stream_bpb_after']:.4f} "
        f"({result['adaptation_bpb']:+.4f}), original val bpb {result['val_bpb_after']:.4f} ({result['forgetting_bpb']:+.4f})")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "source": ckpt})
    save_config(cfg, out_dir / "config.yaml")
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
