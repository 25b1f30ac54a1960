"""Tokenizers: raw bytes; sentencepiece (trained here with lossless settings, or an existing
``.model`` file such as Mistral's); a Hugging Face ``tokenizer.json`` (the `tokenizers` library).

Every tokenizer reports how many source bytes each id stands for (``bytes_per_token``), so that
byte-level and subword models are compared fairly in bits per byte, and a ``fingerprint`` that
shards record: reading shards with a different tokenizer than the one that wrote them is an error.

A tokenizer that adds a dummy prefix (sentencepiece's ``add_dummy_prefix``, a Metaspace
pre-tokenizer) encodes ``"Hello"`` as ``"▁Hello"``: its pieces stand for one byte more than the
document. ``prefix_bytes`` is that surplus, and the EOS id that closes every packed document
counts ``-prefix_bytes``, so the bytes of a document and its EOS add up to the document's source
bytes exactly. ``prepare`` checks that sum and the round trip for every document it keeps.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable

import numpy as np

SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
# EOS spellings looked for in a pretrained tokenizer without a declared EOS (--eos-token overrides)
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


class TokenizerError(ValueError):
    """A tokenizer file cannot be used; the message says why and what to pass."""


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class _Base:
    kind = ""
    model_file: str | None = None
    prefix_bytes = 0
    # decode(encode(text)) == text for any text whose ids' byte counts add up to its size: prepare
    # then checks only that sum (a special token's text, which counts 0 bytes, still fails it)
    lossless_by_construction = False

    def _finish(self) -> None:
        """bytes_per_token with the EOS carrying the dummy-prefix correction."""
        self.bytes_per_token[self.eos_id] = -self.prefix_bytes
        if self.pad_id != self.eos_id:
            self.bytes_per_token[self.pad_id] = 0

    def encode_many(self, docs: list[bytes]) -> list[np.ndarray]:
        return [self.encode(d) for d in docs]

    def decode_many(self, ids: list[np.ndarray]) -> list[bytes]:
        return [self.decode(i) for i in ids]

    def describe(self) -> dict:
        info = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "dtype": np.dtype(self.token_dtype).name,
                "fingerprint": self.fingerprint, "prefix_bytes": self.prefix_bytes}
        if self.model_file:
            info["model_file"] = self.model_file
        return info


class ByteTokenizer(_Base):
    """Raw UTF-8 bytes: ids 0..255 are bytes, then special ids. Lossless by construction."""

    kind = "bytes"
    lossless_by_construction = True
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


def _special_id(lookup, eos_token: str | None, declared: int, what: str) -> int:
    if eos_token is not None:
        i = lookup(eos_token)
        if i is None or i < 0:
            raise TokenizerError(f"{what}: --eos-token {eos_token!r} is not in its vocabulary")
        return i
    if declared is not None and declared >= 0:
        return declared
    for name in EOS_CANDIDATES:
        i = lookup(name)
        if i is not None and i >= 0:
            return i
    raise TokenizerError(f"{what} declares no end-of-document token and has none of "
                         f"{', '.join(EOS_CANDIDATES)}: pass --eos-token PIECE")


class SentencePieceTokenizer(_Base):
    """sentencepiece. Trained here: identity normalization, no dummy prefix, kept whitespace, byte
    fallback and a dedicated newline piece, so decode(encode(text)) == text for any UTF-8 text
    without U+2581 (sentencepiece's whitespace mark). Loaded from a file: whatever the model
    does; documents it cannot reproduce exactly are counted and dropped by prepare."""

    kind = "sentencepiece"
    model_file = SP_MODEL_FILE

    def __init__(self, model_bytes: bytes, eos_token: str | None = None, eos_id: int | None = None) -> None:
        import sentencepiece as spm

        self.model_bytes = model_bytes
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except Exception as exc:
            raise TokenizerError(f"not a sentencepiece model ({exc})") from None
        self.vocab_size = self.sp.get_piece_size()

        def lookup(piece):
            i = self.sp.piece_to_id(piece)
            return i if self.sp.id_to_piece(i) == piece else None
        self.eos_id = eos_id if eos_id is not None else _special_id(lookup, eos_token, self.sp.eos_id(),
                                                                    "the sentencepiece model")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.token_dtype = _dtype_for(self.vocab_size)
        self.fingerprint = "sentencepiece-" + hashlib.sha256(model_bytes).hexdigest()[:16]
        counts = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                counts[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                counts[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self.bytes_per_token = counts
        self.prefix_bytes = max(int(counts[self.sp.encode("a")].sum()) - 1, 0)
        self._finish()

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

    def encode_many(self, docs: list[bytes]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=self.token_dtype)
                for ids in self.sp.encode([d.decode("utf-8") for d in docs], num_threads=1)]

    def _content(self, ids) -> list[int]:
        ids = np.asarray(ids, dtype=np.int64)
        return ids[(ids != self.eos_id) & (ids != self.pad_id)].tolist()

    def decode(self, ids) -> bytes:
        return self.sp.decode(self._content(ids)).encode("utf-8")

    def decode_many(self, ids: list[np.ndarray]) -> list[bytes]:
        return [t.encode("utf-8") for t in self.sp.decode([self._content(i) for i in ids], num_threads=1)]

    def save(self, data_dir: Path) -> None:
        (Path(data_dir) / SP_MODEL_FILE).write_bytes(self.model_bytes)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _mentions(node, type_name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


class HFTokenizer(_Base):
    """A Hugging Face ``tokenizer.json`` through the `tokenizers` library (no hub access).
    Special tokens are never added; an added or special token stands for 0 bytes."""

    kind = "hf"
    model_file = HF_TOKENIZER_FILE

    def __init__(self, json_bytes: bytes, eos_token: str | None = None, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.model_bytes = json_bytes
        try:
            spec = json.loads(json_bytes)
            self.tok = Tokenizer.from_str(json_bytes.decode("utf-8"))
        except Exception as exc:
            raise TokenizerError(f"not a Hugging Face tokenizer.json ({exc})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id if eos_id is not None else _special_id(self.tok.token_to_id, eos_token, None,
                                                                    "the tokenizer.json")
        self.pad_id = self.eos_id
        self.token_dtype = _dtype_for(self.vocab_size)
        self.fingerprint = "hf-" + hashlib.sha256(json_bytes).hexdigest()[:16]
        byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(spec.get("decoder"), "ByteLevel")
        table = _byte_decoder()
        added = {t["id"] for t in spec.get("added_tokens", [])}
        counts = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or i in added:
                continue
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                counts[i] = 1  # byte fallback
            elif byte_level:
                counts[i] = len(piece)  # one printable character per byte
                if any(c not in table for c in piece):
                    counts[i] = len(piece.encode("utf-8"))
            else:
                counts[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        self.bytes_per_token = counts
        self.prefix_bytes = max(int(counts[self.tok.encode("a", add_special_tokens=False).ids].sum()) - 1, 0)
        # byte-level BPE without a normalizer maps bytes to pieces and back one to one
        self.lossless_by_construction = (byte_level and spec.get("normalizer") is None and self.prefix_bytes == 0
                                         and _mentions(spec.get("decoder"), "ByteLevel"))
        self._finish()

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.tok.encode(data.decode("utf-8"), add_special_tokens=False).ids,
                          dtype=self.token_dtype)

    def encode_many(self, docs: list[bytes]) -> list[np.ndarray]:
        # the _fast variant skips the character offsets, which only ids-wanting callers do not need
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        encodings = encode([d.decode("utf-8") for d in docs], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.token_dtype) for e in encodings]

    def decode(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64)
        return self.tok.decode(ids[ids != self.eos_id].tolist(), skip_special_tokens=False).encode("utf-8")

    def decode_many(self, ids: list[np.ndarray]) -> list[bytes]:
        texts = self.tok.decode_batch([i.tolist() for i in ids], skip_special_tokens=False)
        return [t.encode("utf-8") for t in texts]

    def save(self, data_dir: Path) -> None:
        (Path(data_dir) / HF_TOKENIZER_FILE).write_bytes(self.model_bytes)


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def load_tokenizer_file(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """An existing tokenizer: a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json``."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"--tokenizer {path}: no such file (expected a sentencepiece .model or a "
                             "Hugging Face tokenizer.json)")
    data = path.read_bytes()
    try:
        if data.lstrip()[:1] == b"{":
            return HFTokenizer(data, eos_token)
        return SentencePieceTokenizer(data, eos_token)
    except TokenizerError as exc:
        raise TokenizerError(f"--tokenizer {path}: {exc}") from None


def tokenizer_from_manifest(info: dict, data_dir: str | Path | None = None) -> Tokenizer:
    kind = info.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    classes = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}
    if kind not in classes:
        raise ValueError(f"unknown tokenizer kind {kind!r} in manifest (supported: bytes, sentencepiece, hf)")
    if data_dir is None:
        raise ValueError(f"a {kind} dataset needs its directory to load its tokenizer file")
    from .storage import DataStore

    store = DataStore(data_dir)
    name = info.get("model_file", classes[kind].model_file)
    path = store.where(name)
    try:
        tok = classes[kind](store.read_bytes(name), eos_id=info.get("eos_id"))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path} is missing: the dataset's {kind} tokenizer is needed") from None
    if tok.fingerprint != info.get("fingerprint"):
        raise ValueError(f"{path} does not match the manifest's tokenizer fingerprint "
                         f"({tok.fingerprint} != {info.get('fingerprint')}): re-run prepare")
    return tok
