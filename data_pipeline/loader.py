"""Packed fixed-length batches streamed from shards, with an exact-resume state.

Documents are concatenated (each followed by EOS) into one token stream per epoch, cut into
windows of ``seq_len + 1`` tokens (inputs and shifted targets). Shard order is a seeded
permutation that changes every epoch. Global batch g holds windows ``[g*B*W, (g+1)*B*W)``;
data-parallel rank r takes its ``B`` rows of it, so any world size sees the same global data
order. Every rank reads the whole stream (cheap next to a training step at this scale);
splitting shards across ranks and workers is the streaming issue's work.

``state_dict()`` captures (epoch, shard position, documents consumed, leftover tokens): loading
it into a fresh loader yields exactly the batches an uninterrupted loader would have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .shards import ShardError, iter_shard_documents, read_manifest
from .tokenizer import tokenizer_from_manifest


class PackedBatches:
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch_size: int,
                 *, rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"] or not self.manifest["splits"][split]["shards"]:
            raise ShardError(f"{self.data_dir}: split {split!r} has no shards")
        self.tokenizer = tokenizer_from_manifest(self.manifest["tokenizer"])
        self.token_dtype = self.manifest["tokenizer"]["dtype"]
        self.shards = [s["name"] for s in self.manifest["splits"][split]["shards"]]
        self.seq_len, self.batch, self.rank, self.world = seq_len, micro_batch_size, rank, world_size
        self.seed, self.epochs = seed, epochs
        self.bytes_per_token = torch.from_numpy(self.tokenizer.bytes_per_token)
        self._state = {"epoch": 0, "shard_pos": 0, "doc_pos": 0, "buffer": np.zeros(0, np.int64)}

    # -- order -------------------------------------------------------------------------------
    def _shard_order(self, epoch: int) -> list[str]:
        if self.epochs == 1:  # evaluation: fixed stored order
            return list(self.shards)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def _documents(self) -> Iterator[np.ndarray]:
        """Documents from the saved position on, updating the position as they are consumed."""
        st = self._state
        while self.epochs is None or st["epoch"] < self.epochs:
            order = self._shard_order(st["epoch"])
            while st["shard_pos"] < len(order):
                path = self.data_dir / order[st["shard_pos"]]
                for i, (_, tokens) in enumerate(iter_shard_documents(path, self.token_dtype)):
                    if i < st["doc_pos"]:
                        continue
                    st["doc_pos"] = i + 1
                    yield tokens
                st["shard_pos"], st["doc_pos"] = st["shard_pos"] + 1, 0
            st["epoch"], st["shard_pos"] = st["epoch"] + 1, 0

    # -- batches -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        window = self.seq_len + 1
        global_rows = self.batch * self.world
        need = window + (global_rows - 1) * self.seq_len
        eos = np.array([self.tokenizer.eos_id], np.int64)
        docs = self._documents()
        while True:
            buf = self._state["buffer"]
            pieces = [buf]
            have = buf.size
            while have < need:
                try:
                    doc = next(docs)
                except StopIteration:
                    return  # finite (eval) stream: the partial last batch is dropped
                pieces += [doc.astype(np.int64), eos]
                have += doc.size + 1
            buf = np.concatenate(pieces) if len(pieces) > 1 else buf
            # Windows overlap by one token: the target of one is the first input of the next.
            start = self.rank * self.batch * self.seq_len
            rows = np.stack([buf[start + i * self.seq_len: start + i * self.seq_len + window]
                             for i in range(self.batch)])
            self._state["buffer"] = buf[global_rows * self.seq_len:]
            tokens = torch.from_numpy(rows)
            yield {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def target_bytes(self, labels: torch.Tensor) -> torch.Tensor:
        """Source bytes each target id stands for (0 for specials): the bpb denominator."""
        return self.bytes_per_token[labels]

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = self._state
        return {"epoch": st["epoch"], "shard_pos": st["shard_pos"], "doc_pos": st["doc_pos"],
                "buffer": st["buffer"].tolist(), "seed": self.seed, "world_size": self.world,
                "micro_batch_size": self.batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len)):
            if state[key] != mine:
                raise ValueError(f"data loader state has {key}={state[key]}, this run has {mine}: "
                                 f"resume with the same train.seed and model.seq_length")
        if state["world_size"] * state["micro_batch_size"] != self.world * self.batch:
            raise ValueError(
                f"data loader state was saved with a global batch of {state['world_size']} ranks x "
                f"{state['micro_batch_size']} rows; this run has {self.world} x {self.batch}. "
                "Keep data-parallel size x train.micro_batch_size equal to resume exactly.")
        self._state = {"epoch": state["epoch"], "shard_pos": state["shard_pos"],
                       "doc_pos": state["doc_pos"], "buffer": np.asarray(state["buffer"], np.int64)}
