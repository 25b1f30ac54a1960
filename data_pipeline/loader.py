"""Packed fixed-length batches streamed from shards, split across ranks and DataLoader workers,
with an exact-resume state.

Slots. A data-parallel rank r with W workers owns slots ``r*W .. r*W + W-1`` of
``S = world * max(W, 1)``. In epoch e the shards are permuted with seed (seed, e) and slot s
reads shards ``perm[s], perm[s + S], ...``: no two slots share a shard, and within one epoch
every document is read exactly once across all ranks and workers. Each slot cycles through
epochs on its own (a new permutation every epoch), forever unless ``epochs`` is set.

Shards come from a local directory or a URL through ``storage.DataStore``: each is checked
against the manifest's size and sha256 (and its ids against the vocabulary) before any of its
documents is used; a damaged one raises ``ShardError`` (or is skipped and counted with
``on_error="skip"``), a store unreachable past its retries raises ``StoreError`` (never skipped:
the run stops and resumes exactly once the store is back).

Per slot, documents pass an optional seeded shuffle buffer (``shuffle_buffer`` documents), are
joined with EOS and cut into windows of ``seq_len + 1`` tokens (consecutive windows share one
token, so every token is predicted exactly once). ``micro_batch_size`` windows make a batch.
With ``window_order="shuffled"`` a slot cuts each whole shard that way and emits its windows in a
seeded permutation (seed, epoch, shard position, slot): a batch's rows come from anywhere in the
shard instead of one stretch of one document. Why: with consecutive windows a small run follows
the few documents it last read (the demo's baseline: 0.23 bpb worse at equal tokens than rows at
random offsets). Each shard's last ``len % seq_len`` tokens and ``windows % micro_batch_size``
windows are left out of that epoch; the position is (epoch, shard, window), so a resume is exact,
and a change of layout is refused (reshard re-splits document positions, not window ones).
Workers send batches in groups of ``BATCHES_PER_ITEM`` (a DataLoader item has a fixed cost); a
rank's batch n comes from its worker ``(n // 8) % W``, in the DataLoader's round-robin order.

Resume. Each batch travels with its slot's state after producing it (epoch, shard position,
documents consumed, leftover tokens, shuffle buffer as document references plus RNG state,
skipped shards). ``state_dict()`` holds the last consumed state of every slot and the number of
batches consumed, so a rebuilt loader continues with exactly the batches an uninterrupted one
would have produced, when the layout is the same. After a change of data-parallel size, worker
count, micro batch or sequence length, ``reshard_from(states of every old rank)`` continues
instead: the epochs any slot had begun are finished with every document read exactly once (none
repeated, none dropped; partly emitted documents resume at the token they had reached), and
later epochs follow the new layout (data_pipeline/reshard.py). The seed must stay the same.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .reshard import ReshardError, fresh_slot_state, reshard, slot_shards
from .shards import ShardError, parse_shard, read_manifest
from .storage import DataStore, StoreError, is_url
from .tokenizer import tokenizer_from_manifest

LAYOUT_KEYS = ("world_size", "num_workers", "micro_batch_size", "seq_len", "seed", "shuffle_buffer",
               "per_item", "window_order")
LAYOUT_DEFAULTS = {"window_order": "stream"}  # keys that states saved before them lack
WINDOW_ORDERS = ("stream", "shuffled")
BATCHES_PER_ITEM = 8  # batches a worker sends per DataLoader item


class SlotStream:
    """One slot's documents -> packed batches, resumable from a state dict."""

    def __init__(self, spec: dict, slot: int, state: dict | None):
        self.spec, self.slot = spec, slot
        self.state = dict(state) if state is not None else fresh_slot_state()
        self.store = DataStore(spec["data_dir"])
        self._ahead: dict = {}  # shard -> future of its bytes
        self._pool = None

    # -- documents ---------------------------------------------------------------------------
    def _shards(self, epoch: int) -> list[str]:
        stored_order = self.spec["epochs"] == 1 and not self.spec["shuffle_buffer"]  # evaluation
        return slot_shards(self.spec["shards"], self.spec["seed"], epoch, self.slot, self.spec["num_slots"],
                           stored_order)

    def _fetch(self, shard: str) -> bytes:
        size, sha256 = self.spec["shard_meta"].get(shard, (None, None))
        return self.store.shard_bytes(shard, size, sha256)

    def _prefetch(self, shard: str | None) -> None:
        """Start fetching the shard read next (remote stores: the transfer overlaps this one's
        parsing and packing)."""
        if shard is None or not self.store.remote or shard in self._ahead:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        self._ahead[shard] = self._pool.submit(self._fetch, shard)

    def _read(self, shard: str) -> Iterator[tuple[int, np.ndarray]]:
        """A shard's documents, from bytes that matched the manifest's size and sha256 and ids
        inside the vocabulary: nothing of a damaged shard reaches a batch."""
        ahead = self._ahead.pop(shard, None)
        data = ahead.result() if ahead is not None else self._fetch(shard)
        yield from enumerate(t for _, t in parse_shard(data, self.store.where(shard), self.spec["dtype"],
                                                       self.spec["fingerprint"], self.spec["vocab_size"]))

    def _shard_documents(self, shard: str, first: int, stop: int | None) -> Iterator[tuple[str, int, np.ndarray]]:
        """Documents ``max(first, doc_pos) .. stop`` of a shard; ``doc_pos`` advances as they go."""
        st = self.state
        with self._skip_damaged(shard):  # documents before the damage were used
            for i, tokens in self._read(shard):
                if stop is not None and i >= stop:
                    break
                if i >= max(first, st["doc_pos"]):
                    st["doc_pos"] = i + 1
                    yield shard, i, tokens

    @contextmanager
    def _skip_damaged(self, shard: str):
        """With ``on_error="skip"`` a damaged shard is recorded in the state and reading goes on."""
        try:
            yield
        except ShardError:
            if self.spec["on_error"] != "skip":
                raise
            self.state["skipped"].append(shard)

    def _own_shards(self) -> Iterator[str]:
        """The slot's shards from the saved (epoch, shard_pos) on, the next one prefetched; the
        position moves past a shard when the caller asks for the one after it."""
        st = self.state
        while self.spec["epochs"] is None or st["epoch"] < self.spec["epochs"]:
            shards = self._shards(st["epoch"])
            while st["shard_pos"] < len(shards):
                self._prefetch(shards[st["shard_pos"] + 1] if st["shard_pos"] + 1 < len(shards) else None)
                yield shards[st["shard_pos"]]
                st["shard_pos"], st["doc_pos"] = st["shard_pos"] + 1, 0
            st["epoch"], st["shard_pos"] = st["epoch"] + 1, 0

    def _raw_documents(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """(shard, index, tokens) from the saved position on; the position advances as they go.
        A resharded slot first reads its carry (data_pipeline/reshard.py)."""
        st = self.state
        while st.get("carry"):
            shard, first, stop = st["carry"][0]
            self._prefetch(st["carry"][1][0] if len(st["carry"]) > 1 else None)
            yield from self._shard_documents(shard, first, stop)
            st["carry"], st["doc_pos"] = st["carry"][1:], 0
        for shard in self._own_shards():
            yield from self._shard_documents(shard, 0, None)

    def _documents(self) -> Iterator[tuple[str, int, np.ndarray]]:
        size = self.spec["shuffle_buffer"]
        if not size:
            yield from self._raw_documents()
            return
        st = self.state
        rng = np.random.default_rng([self.spec["seed"], 7919, self.slot])
        if st["rng"] is not None:  # resume: continue the saved generator
            rng.bit_generator.state = st["rng"]
        buffer = self._reload(st["shuffle_refs"])  # [(shard, index, tokens)]
        for item in self._raw_documents():
            buffer.append(item)
            if len(buffer) < size:
                self._remember(buffer, rng)  # consumed from the shard, now held here
                continue
            chosen = buffer.pop(int(rng.integers(len(buffer))))
            self._remember(buffer, rng)
            yield chosen
        while buffer:  # finite stream: drain
            chosen = buffer.pop(int(rng.integers(len(buffer))))
            self._remember(buffer, rng)
            yield chosen

    def _remember(self, buffer, rng) -> None:
        self.state["shuffle_refs"] = [(s, i) for s, i, _ in buffer]
        self.state["rng"] = rng.bit_generator.state

    def _reload(self, refs: list) -> list:
        """Re-read referenced documents (a saved shuffle buffer, pending leftover tokens); a
        third element of a reference skips that many leading tokens (emitted before a reshard)."""
        wanted: dict[str, set[int]] = {}
        for ref in refs:
            wanted.setdefault(ref[0], set()).add(ref[1])
        found = {}
        for shard, indices in wanted.items():
            for i, tokens in self._read(shard):
                if i in indices:
                    found[(shard, i)] = tokens
        return [(r[0], r[1], found[(r[0], r[1])][r[2] if len(r) > 2 else 0:]) for r in refs]

    # -- batches -----------------------------------------------------------------------------
    def _shuffled_window_batches(self) -> Iterator[tuple[np.ndarray, dict]]:
        """``window_order="shuffled"``: ([micro_batch_size, seq_len + 1] tokens, state after
        them) per batch, each shard's windows in a seeded permutation."""
        seq, rows, spec, st = self.spec["seq_len"], self.spec["micro_batch_size"], self.spec, self.state
        eos = np.array([spec["eos_id"]], dtype=spec["dtype"])
        st.setdefault("window_pos", 0)
        barren = 0  # shards in a row too short for one batch: a whole epoch of them never ends
        for shard in self._own_shards():
            docs = []
            with self._skip_damaged(shard):
                docs = [piece for _, tokens in self._read(shard) for piece in (tokens, eos)]
            stream = np.concatenate(docs) if docs else np.zeros(0, spec["dtype"])
            windows = max(stream.size - 1, 0) // seq
            order = np.random.default_rng(
                [spec["seed"], 104729, st["epoch"], st["shard_pos"], self.slot]).permutation(windows)
            barren = barren + 1 if st["window_pos"] + rows > windows else 0
            if barren > len(self._shards(st["epoch"])):
                raise ValueError(
                    f"data.window_order=shuffled: no shard of this slot holds {rows} windows of "
                    f"{seq} tokens (micro_batch_size x seq_len + 1 = {rows * seq + 1}), and a batch "
                    "never mixes shards in this mode; use data.window_order=stream, or a smaller "
                    "micro_batch_size or seq_length")
            while st["window_pos"] + rows <= windows:
                picked = order[st["window_pos"]:st["window_pos"] + rows]
                st["window_pos"] += rows
                yield stream[picked[:, None] * seq + np.arange(seq + 1)], self.snapshot()
            st["window_pos"] = 0

    def batches(self) -> Iterator[tuple[np.ndarray, dict]]:
        """(``seq_len * micro_batch_size + 1`` tokens, state after them) per batch."""
        if self.spec["window_order"] == "shuffled":
            yield from self._shuffled_window_batches()
            return
        seq, rows = self.spec["seq_len"], self.spec["micro_batch_size"]
        need = seq * rows + 1
        st = self.state
        eos = np.array([self.spec["eos_id"]], dtype=self.spec["dtype"])
        # Rebuild the leftover tokens from the referenced documents (empty on a fresh start).
        lengths = []  # tokens of each pending document, EOS included
        pieces = []
        for _, _, tokens in self._reload(st["pending"]):
            pieces += [tokens, eos]
            lengths.append(tokens.size + 1)
        buf = np.concatenate(pieces)[st["offset"]:] if pieces else np.zeros(0, self.spec["dtype"])
        docs = self._documents()
        while True:
            pieces, have = [buf], buf.size
            while have < need:
                try:
                    shard, index, tokens = next(docs)
                except StopIteration:
                    return  # finite stream: the partial last batch is dropped
                pieces += [tokens, eos]
                have += tokens.size + 1
                st["pending"] = st["pending"] + [(shard, index)]
                lengths.append(tokens.size + 1)
            buf = np.concatenate(pieces) if len(pieces) > 1 else buf
            window = buf[:need].copy()  # compact dtype: cheap to hand over from a worker
            buf = buf[seq * rows:]
            offset = st["offset"] + seq * rows
            drop = 0
            while drop < len(lengths) and offset >= lengths[drop]:
                offset -= lengths[drop]
                drop += 1
            if drop:
                del lengths[:drop]
                st["pending"] = st["pending"][drop:]
            st["offset"] = offset
            yield window, self.snapshot()

    def snapshot(self) -> dict:
        """The state after the batch just produced. Lists that are replaced, never mutated in
        place, are shared; ``skipped`` is appended to, so it is copied."""
        return {**self.state, "skipped": list(self.state["skipped"])}


class _WorkerStreams(IterableDataset):
    """Runs inside DataLoader workers. Worker d serves logical worker (d + offset) % W and sends
    its batches in groups of ``per_item``: a DataLoader item costs ~0.3 ms whatever its size, and
    groups of 8 x 32 KiB beat bigger ones, which stall on the 64 KiB pipe buffer.
    ``first_item[logical]`` shortens a first group to finish one interrupted before a resume."""

    def __init__(self, spec: dict, rank: int, states: list, offset: int, first_item: list[int]):
        self.spec, self.rank, self.states = spec, rank, states
        self.offset, self.first_item = offset, first_item

    def __iter__(self):
        info = get_worker_info()
        workers = max(self.spec["num_workers"], 1)
        logical = ((info.id if info else 0) + self.offset) % workers
        slot = self.rank * workers + logical
        size, windows, states = self.first_item[logical], [], []
        for window, state in SlotStream(self.spec, slot, self.states[logical]).batches():
            windows.append(window)
            states.append(state)
            if len(windows) == size:
                yield logical, np.stack(windows), states
                size, windows, states = self.spec["per_item"], [], []
        if windows:
            yield logical, np.stack(windows), states


def _identity(x):
    return x


def _saved(state: dict, key: str):
    """A layout key of a saved loader state; states from before the key have its default."""
    return state["layout"].get(key, LAYOUT_DEFAULTS.get(key))


class StreamingLoader:
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch_size: int, *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 0, epochs: int | None = None, on_error: str = "raise",
                 mask_documents: bool = False, window_order: str = "stream"):
        self.data_dir = data_dir if is_url(data_dir) else Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits or not splits[split]["shards"]:
            raise ShardError(f"{self.data_dir}: split {split!r} has no shards")
        self.tokenizer = tokenizer_from_manifest(self.manifest["tokenizer"], self.data_dir)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} (allowed: raise, skip)")
        if window_order not in WINDOW_ORDERS:
            raise ValueError(f"window_order={window_order!r} (allowed: {', '.join(WINDOW_ORDERS)})")
        shards = [s["name"] for s in splits[split]["shards"]]
        num_slots = world_size * max(num_workers, 1)
        if len(shards) < num_slots:
            raise ShardError(
                f"{self.data_dir}: split {split!r} has {len(shards)} shards, fewer than data-parallel "
                f"ranks x workers = {num_slots}; re-run prepare with a smaller --shard-mb or use "
                "fewer workers")
        self.rank, self.world, self.num_workers = rank, world_size, num_workers
        self.mask_documents = mask_documents
        meta = {s["name"]: (s.get("size"), s.get("sha256")) for s in splits[split]["shards"]}
        self.spec = {"data_dir": str(self.data_dir), "shards": shards, "shard_meta": meta, "num_slots": num_slots,
                     "seq_len": seq_len, "micro_batch_size": micro_batch_size, "seed": seed,
                     "shuffle_buffer": shuffle_buffer, "epochs": epochs, "on_error": on_error,
                     "eos_id": self.tokenizer.eos_id, "dtype": self.manifest["tokenizer"]["dtype"],
                     "vocab_size": self.tokenizer.vocab_size,
                     "fingerprint": self.manifest["tokenizer"].get("fingerprint"),
                     "num_workers": num_workers, "per_item": BATCHES_PER_ITEM, "window_order": window_order}
        self.bytes_per_token = torch.from_numpy(self.tokenizer.bytes_per_token)
        self._states: list = [None] * max(num_workers, 1)
        self._consumed = 0

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            stream = SlotStream(self.spec, self.rank, self._states[0])
            source = ((0, w[None], [st]) for w, st in stream.batches())
        else:
            # Batch n of this rank is item n // k, from worker (n // k) % W, in DataLoader
            # round-robin order; resuming mid-item, that worker first sends the remainder.
            k, W = self.spec["per_item"], self.num_workers
            item, within = divmod(self._consumed, k)
            first_item = [k] * W
            first_item[item % W] = k - within
            dataset = _WorkerStreams(self.spec, self.rank, self._states, item % W, first_item)
            source = DataLoader(dataset, batch_size=None, num_workers=W, collate_fn=_identity,
                                prefetch_factor=2, multiprocessing_context="fork")
        try:
            yield from self._consume(source)
        except (ShardError, StoreError) as exc:  # from a worker: keep the message, drop its traceback
            lines = str(exc).strip().splitlines()
            raise type(exc)(lines[-1].split(f"{type(exc).__name__}: ", 1)[-1]) from None

    def _consume(self, source) -> Iterator[dict]:
        seq, rows = self.spec["seq_len"], self.spec["micro_batch_size"]
        # Windows cross the worker boundary as one compact (uint16) numpy array per item: a numpy
        # pickle through the pipe beats tensors' shared-memory handles, and 4x fewer bytes than
        # int64 beat converting in the worker.
        for logical, windows, states in source:
            for window, state in zip(windows, states):
                self._states[logical] = state
                self._consumed += 1
                tokens = torch.from_numpy(window.astype(np.int64))
                if tokens.dim() == 2:  # shuffled windows: one row of seq + 1 tokens each
                    yield self._batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
                    continue
                # Consecutive rows share one token: row i is tokens[i*seq : (i+1)*seq + 1].
                yield self._batch(tokens[:-1].view(rows, seq), tokens[1:].view(rows, seq))

    def _batch(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict:
        batch = {"input_ids": inputs, "labels": labels}
        if self.mask_documents:
            batch["segment_ids"] = self.segment_ids(inputs)
        return batch

    def segment_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Document index of each position within its row: EOS closes a document, so it
        belongs to the one it ends. Attention between different segments can be masked."""
        is_eos = (input_ids == self.tokenizer.eos_id).long()
        return torch.cumsum(is_eos, dim=1) - is_eos

    def target_bytes(self, labels: torch.Tensor) -> torch.Tensor:
        """Source bytes each target id stands for (0 for specials): the bpb denominator."""
        return self.bytes_per_token[labels]

    @property
    def skipped_shards(self) -> int:
        return sum(len(s["skipped"]) for s in self._states if s is not None)

    def state_dict(self) -> dict:
        layout = {"world_size": self.world, "num_workers": self.num_workers, "rank": self.rank,
                  "micro_batch_size": self.spec["micro_batch_size"], "seq_len": self.spec["seq_len"],
                  "seed": self.spec["seed"], "shuffle_buffer": self.spec["shuffle_buffer"],
                  "per_item": self.spec["per_item"], "window_order": self.spec["window_order"]}
        return {"layout": layout, "consumed": self._consumed, "slots": copy.deepcopy(self._states)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()["layout"]
        for key in LAYOUT_KEYS:
            if _saved(state, key) != mine[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={_saved(state, key)}, this run has "
                    f"{key}={mine[key]}; exact resume needs the same data layout (data-parallel "
                    "size, data.num_workers, train.micro_batch_size, model.seq_length, train.seed, "
                    "data.shuffle_buffer, data.window_order)")
        self._states = copy.deepcopy(state["slots"])
        self._consumed = state["consumed"]

    def same_layout(self, state: dict) -> bool:
        mine = self.state_dict()["layout"]
        return all(_saved(state, key) == mine[key] for key in LAYOUT_KEYS)

    def reshard_from(self, saved: list[dict]) -> str:
        """Continue from the loader states of every rank of a run with another layout (data-
        parallel size, workers, batch shape): the epochs it had begun are finished with each
        document read exactly once (data_pipeline/reshard.py), later ones follow this layout.
        Returns one line saying what changed."""
        old = {key: _saved(saved[0], key) for key in LAYOUT_KEYS}
        if "shuffled" in (old["window_order"], self.spec["window_order"]):
            raise ReshardError(
                f"data.window_order={self.spec['window_order']} (saved: {old['window_order']}): a "
                "shuffled-window position cannot be re-split over another layout; resume with the "
                "saved layout, or start the data from scratch with --resume never")
        states = reshard(saved, self.spec)
        workers = max(self.num_workers, 1)
        self._states = states[self.rank * workers:(self.rank + 1) * workers]
        self._consumed = 0
        changed = [f"{key} {old[key]} -> {self.state_dict()['layout'][key]}" for key in LAYOUT_KEYS
                   if old[key] != self.state_dict()["layout"][key]]
        return (f"data loader resharded ({', '.join(changed)}): epochs up to {states[0]['epoch'] - 1} "
                "finish with every document read once, then the new layout")
