"""Tokenizers. Every one reports how many source bytes each id stands for, so that losses of
byte-level and subword models are compared fairly in bits per byte."""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0..255 are bytes, then special ids. Lossless by construction."""

    kind = "bytes"
    EOS = 256   # document separator in packed sequences
    PAD = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.eos_id = self.EOS
        self.pad_id = self.PAD
        self.token_dtype = np.uint16
        # Source bytes per id: 1 for real bytes, 0 for specials.
        self.bytes_per_token = np.concatenate([np.ones(256, np.int64), np.zeros(2, np.int64)])

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(self.token_dtype)

    def decode(self, ids) -> bytes:
        arr = np.asarray(ids, dtype=np.int64)
        return arr[arr < 256].astype(np.uint8).tobytes()

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "dtype": np.dtype(self.token_dtype).name}


def tokenizer_from_manifest(info: dict) -> ByteTokenizer:
    kind = info.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r} in manifest (supported: bytes)")
