"""Tokenizers: raw bytes, or sentencepiece (BPE / unigram) trained here with lossless settings.

Every tokenizer reports how many source bytes each id stands for (``bytes_per_token``), so that
byte-level and subword models are compared fairly in bits per byte, and a ``fingerprint`` that
shards record: reading shards with a different tokenizer than the one that wrote them is an error.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable

import numpy as np

SP_MODEL_FILE = "tokenizer.model"


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
        self.fingerprint = "bytes-v1"
        self.bytes_per_token = np.concatenate([np.ones(256, np.int64), np.zeros(2, np.int64)])

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(self.token_dtype)

    def decode(self, ids) -> bytes:
        arr = np.asarray(ids, dtype=np.int64)
        return arr[arr < 256].astype(np.uint8).tobytes()

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "dtype": np.dtype(self.token_dtype).name,
                "fingerprint": self.fingerprint}


class SentencePieceTokenizer:
    """sentencepiece with identity normalization, no dummy prefix, kept whitespace, byte
    fallback and a dedicated newline piece: decode(encode(text)) == text for any UTF-8 text
    without the U+2581 character (sentencepiece's whitespace mark)."""

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes) -> None:
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.token_dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        self.fingerprint = "sentencepiece-" + hashlib.sha256(model_bytes).hexdigest()[:16]
        counts = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                counts[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                counts[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self.bytes_per_token = counts

    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int,
              model_type: str = "bpe") -> "SentencePieceTokenizer":
        """Deterministic: the input is read in order (no sampling below 2M sentences)."""
        import sentencepiece as spm

        def sentences():
            for doc in documents:
                for line in doc.decode("utf-8").splitlines(keepends=True):
                    for start in range(0, len(line), 2048):  # under max_sentence_length
                        yield line[start:start + 2048]

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
            user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
            split_digits=True, character_coverage=1.0, unk_id=0, eos_id=1, pad_id=2, bos_id=-1,
            max_sentence_length=8192, input_sentence_size=2_000_000, shuffle_input_sentence=False,
            seed_sentencepiece_size=1_000_000, num_threads=2,
            minloglevel=2)
        return cls(model.getvalue())

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.sp.encode(data.decode("utf-8")), dtype=self.token_dtype)

    def decode(self, ids) -> bytes:
        ids = [int(i) for i in ids if int(i) != self.eos_id and int(i) != self.pad_id]
        return self.sp.decode(ids).encode("utf-8")

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "dtype": np.dtype(self.token_dtype).name,
                "fingerprint": self.fingerprint, "model_file": SP_MODEL_FILE}

    def save(self, data_dir: Path) -> None:
        (data_dir / SP_MODEL_FILE).write_bytes(self.model_bytes)


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def tokenizer_from_manifest(info: dict, data_dir: str | Path | None = None) -> Tokenizer:
    kind = info.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if data_dir is None:
            raise ValueError("a sentencepiece dataset needs its directory to load tokenizer.model")
        path = Path(data_dir) / info.get("model_file", SP_MODEL_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the dataset's sentencepiece model is needed")
        tok = SentencePieceTokenizer(path.read_bytes())
        if tok.fingerprint != info.get("fingerprint"):
            raise ValueError(f"{path} does not match the manifest's tokenizer fingerprint "
                             f"({tok.fingerprint} != {info.get('fingerprint')}): re-run prepare")
        return tok
    raise ValueError(f"unknown tokenizer kind {kind!r} in manifest (supported: bytes, sentencepiece)")
