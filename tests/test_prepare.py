"""Streaming prepare: input formats, URL sources, pretrained tokenizers, bad input, parallel and
multi-task determinism, resume after a kill, and a model trained on the result."""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import StreamingLoader
from data_pipeline.prepare import PHASES, manifest_digest, prepare
from data_pipeline.readers import InputError
from data_pipeline.shards import ShardError, iter_documents, read_manifest
from data_pipeline.tokenizer import tokenizer_from_manifest

from helpers import ROOT, losses_by_step, run_cli, train_cmd

QUIET = {"log": lambda *_: None}
LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "naïve café — ünïcödé ✓ 日本語", "The slings and arrows of outrageous fortune,", "    indented   spaces\ttab"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {seed}.{i}: " + "\n".join(LINES[j % len(LINES)] for j in rng.integers(0, 50, size=3 + i % 9))
            for i in range(n)]


def jsonl_bytes(texts: list[str], **extra) -> bytes:
    return "".join(json.dumps({"text": t, **extra}, ensure_ascii=False) + "\n" for t in texts).encode()


def decoded(data_dir: Path, split: str = "train") -> list[tuple[str, str]]:
    tok = tokenizer_from_manifest(read_manifest(data_dir)["tokenizer"], data_dir)
    return [(name, tok.decode(ids).decode("utf-8")) for name, ids in iter_documents(data_dir, split)]


@pytest.fixture(scope="module")
def formats_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """The same 60 documents as plain, gzip and zstd JSON Lines and as Parquet (3 row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("formats")
    texts = documents(60)
    raw = jsonl_bytes(texts)
    (root / "plain").mkdir()
    (root / "plain" / "docs.jsonl").write_bytes(raw)
    (root / "gz").mkdir()
    (root / "gz" / "docs.jsonl.gz").write_bytes(gzip.compress(raw[:4000]) + gzip.compress(raw[4000:]))  # 2 members
    (root / "zst").mkdir()
    (root / "zst" / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": texts}), root / "parquet" / "docs.parquet", row_group_size=20)
    return root, texts


@pytest.mark.parametrize("fmt", ["plain", "gz", "zst", "parquet"])
def test_every_input_format_gives_the_documents_in_order(tmp_path, formats_corpus, fmt):
    root, texts = formats_corpus
    manifest = prepare(str(root / fmt), tmp_path / "out", val_fraction=0.0, shard_mb=0.01, **QUIET)
    back = decoded(tmp_path / "out")
    assert [t for _, t in back] == texts
    file = next((root / fmt).iterdir()).name
    first = 1 if fmt != "parquet" else 0  # JSON Lines count lines from 1, Parquet rows from 0
    assert back[0][0] == f"{file}:{first}"
    assert manifest["bad_input"] == {} and manifest["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert "names" not in manifest["splits"]["train"]  # names live in the shards, not the manifest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """Serve a directory on 127.0.0.1 (a real HTTP server in a thread), stopped afterwards."""
    servers = []

    def serve(directory: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_url_source_over_http_gives_the_same_dataset(tmp_path, formats_corpus, http_server):
    root = tmp_path / "src"
    shutil.copytree(formats_corpus[0], root)
    for i in range(4):  # more groups to split
        (root / "plain" / f"more-{i}.jsonl").write_bytes(jsonl_bytes(documents(10, seed=10 + i)))
    local = prepare(str(root), tmp_path / "local", val_fraction=0.3, shard_mb=0.01, **QUIET)
    remote = prepare(http_server(root) + "/", tmp_path / "remote", val_fraction=0.3, shard_mb=0.01, **QUIET)
    assert remote["digest"] == local["digest"]  # same files, same split and shards, wherever they live
    assert remote["splits"]["val"]["documents"] > 0 and remote["sources"] != local["sources"]
    assert remote["duplicates_removed"] == local["duplicates_removed"] == 180  # 4 formats, same texts


# -- pretrained tokenizers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, Path]:
    """A byte-level BPE tokenizer.json and a Mistral-style sentencepiece model (identity
    normalization, dummy prefix, byte fallback), both trained here on shipped text."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tokenizers")
    texts = documents(200, seed=1)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(root / "tokenizer.json"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, character_coverage=1.0, minloglevel=2)
    (root / "tokenizer.model").write_bytes(model.getvalue())
    return {"hf": root / "tokenizer.json", "sentencepiece": root / "tokenizer.model"}


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_pretrained_tokenizer_round_trips_with_exact_bytes(tmp_path, formats_corpus, tokenizer_files, kind):
    root, texts = formats_corpus
    manifest = prepare(str(root / "plain"), tmp_path / "out", tokenizer=str(tokenizer_files[kind]),
                       val_fraction=0.0, shard_mb=0.01, **QUIET)
    tok = tokenizer_from_manifest(manifest["tokenizer"], tmp_path / "out")
    assert tok.kind == kind and manifest["dropped_not_lossless"] == 0
    assert tok.prefix_bytes == (1 if kind == "sentencepiece" else 0)  # the dummy prefix
    assert [t for _, t in decoded(tmp_path / "out")] == texts
    # bpb denominators: a document's tokens plus its closing EOS stand for exactly its bytes
    for (_, ids), text in zip(iter_documents(tmp_path / "out", "train"), texts):
        assert int(tok.bytes_per_token[ids.astype(np.int64)].sum() + tok.bytes_per_token[tok.eos_id]) == len(text.encode())
    batch = next(iter(StreamingLoader(tmp_path / "out", "train", 32, 2, epochs=1)))
    assert int(batch["labels"].max()) < tok.vocab_size


def test_lossy_documents_are_counted_and_dropped(tmp_path, tokenizer_files):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(jsonl_bytes(documents(20) + ["text naming the <|endoftext|> token"]))
    manifest = prepare(str(src), tmp_path / "out", tokenizer=str(tokenizer_files["hf"]), val_fraction=0.0, **QUIET)
    assert manifest["dropped_not_lossless"] == 1 and manifest["splits"]["train"]["documents"] == 20


def test_a_normalizing_tokenizer_is_checked_by_decoding(tmp_path):
    """Lowercasing keeps byte counts: only the round trip shows the documents it changes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(documents(50), trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(jsonl_bytes(["all lower case here", "Has Capitals", "more lower case"]))
    manifest = prepare(str(src), tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"), val_fraction=0.0, **QUIET)
    assert manifest["dropped_not_lossless"] == 1 and manifest["splits"]["train"]["documents"] == 2


def test_a_bad_tokenizer_file_is_a_clear_error(tmp_path, formats_corpus):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    result = run_cli("-m", "data_pipeline", "prepare", "--source", str(formats_corpus[0] / "plain"),
                     "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "junk.model"))
    assert result.returncode == 2 and "junk.model" in result.stderr and "sentencepiece" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def bad_corpus(tmp_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "bad"
    src.mkdir()
    good = jsonl_bytes(documents(30))
    (src / "a_mixed.jsonl").write_bytes(
        jsonl_bytes(["a fine document"]) + b'{"text": "unterminated\n' + b'{"body": "no text field"}\n'
        + b'{"text": 42}\n' + b'{"text": ""}\n' + b'{"text": "caf\xe9 in latin-1"}\n' + b"\n" + jsonl_bytes(["another fine one"]))
    (src / "b_empty.txt").write_bytes(b"")
    (src / "c_cut.jsonl.gz").write_bytes(gzip.compress(good)[:-30])
    import zstandard

    (src / "c_cut2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good)[:-30])
    pq.write_table(pa.table({"text": documents(10)}), src / "d_cut.parquet")
    data = (src / "d_cut.parquet").read_bytes()
    (src / "d_cut.parquet").write_bytes(data[:len(data) // 2])
    pq.write_table(pa.table({"body": ["no text column"]}), src / "e_nocolumn.parquet")
    (src / "f_latin1.txt").write_bytes("a text file in latin-1: café".encode("latin-1"))
    return src


def test_bad_input_is_counted_per_file_and_the_rest_kept(tmp_path, bad_corpus):
    manifest = prepare(str(bad_corpus), tmp_path / "out", tokenizer="sentencepiece", vocab_size=400,
                       val_fraction=0.0, **QUIET)
    errors = {Path(p).name: kinds for p, kinds in manifest["input_errors"].items()}
    assert errors["a_mixed.jsonl"] == {"malformed_json": 1, "missing_field": 2, "empty": 1, "not_utf8": 1}
    assert errors["b_empty.txt"] == {"empty": 1}
    assert errors["c_cut.jsonl.gz"] == errors["c_cut2.jsonl.zst"] == {"truncated": 1}
    assert errors["d_cut.parquet"] == {"truncated": 1}
    assert errors["e_nocolumn.parquet"] == {"missing_field": 1}
    assert errors["f_latin1.txt"] == {"not_utf8": 1}  # a subword tokenizer needs UTF-8
    names = [n for n, _ in iter_documents(tmp_path / "out", "train")]
    assert "a_mixed.jsonl:1" in names and "a_mixed.jsonl:8" in names
    assert sum(n.startswith("c_cut") for n in names) > 0  # documents before the cut are kept
    assert manifest["bad_input"]["not_utf8"] == manifest["dropped_not_utf8"] == 2


def test_bytes_tokenizer_keeps_non_utf8_text_files(tmp_path, bad_corpus):
    manifest = prepare(str(bad_corpus), tmp_path / "out", val_fraction=0.0, **QUIET)
    assert "f_latin1.txt" in dict(iter_documents(tmp_path / "out", "train"))
    assert "not_utf8" not in {Path(p).name: k for p, k in manifest["input_errors"].items()}.get("f_latin1.txt", {})


@pytest.mark.parametrize("victim,where", [("a_mixed.jsonl", "a_mixed.jsonl:2"), ("d_cut.parquet", "d_cut.parquet")])
def test_on_error_fail_stops_at_the_first_bad_input_naming_it(tmp_path, bad_corpus, victim, where):
    with pytest.raises(InputError, match=where):
        prepare(str(bad_corpus / victim), tmp_path / "out", on_error="fail", **QUIET)
    assert not (tmp_path / "out").exists()


def test_on_error_fail_from_the_command_line(tmp_path, bad_corpus):
    result = run_cli("-m", "data_pipeline", "prepare", "--source", str(bad_corpus / "a_mixed.jsonl"),
                     "--out", str(tmp_path / "out"), "--on-error", "fail", "--no-progress")
    assert result.returncode == 2 and "malformed json" in result.stderr and "a_mixed.jsonl:2" in result.stderr
    assert "Traceback" not in result.stderr


# -- determinism across workers and tasks ------------------------------------------------------------
@pytest.fixture(scope="module")
def many_units(tmp_path_factory) -> Path:
    """12 JSONL files with duplicates across them and a group field: several units."""
    root = tmp_path_factory.mktemp("units")
    shared = documents(5, seed=99)
    for i in range(12):
        rows = [{"text": t, "site": f"s{(i * 7 + j) % 9}"} for j, t in enumerate(documents(25, seed=i) + shared)]
        (root / f"part-{i:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_one_and_two_workers_and_two_tasks_give_the_same_digest(tmp_path, many_units):
    kwargs = dict(val_fraction=0.2, shard_mb=0.004, unit_mb=0.01, group_field="site", dedup_partitions=8, **QUIET)
    one = prepare(str(many_units), tmp_path / "w1", workers=1, **kwargs)
    two = prepare(str(many_units), tmp_path / "w2", workers=2, **kwargs)
    for phase in PHASES:  # two "nodes" taking turns, phase by phase
        for task in range(2 if phase != "plan" else 1):
            prepare(str(many_units), tmp_path / "t2", phase=phase, task_index=task, task_count=2, **kwargs)
    assert one["digest"] == two["digest"] == manifest_digest(tmp_path / "t2")
    assert one["duplicates_removed"] == 5 * 11  # the shared documents are kept once
    names = {split: {n for n, _ in iter_documents(tmp_path / "w1", split)} for split in ("train", "val")}
    site = {f"{p.name}:{i + 1}": json.loads(line)["site"] for p in many_units.iterdir()
            for i, line in enumerate(p.read_text().splitlines())}
    assert {site[n] for n in names["val"]} and not {site[n] for n in names["val"]} & {site[n] for n in names["train"]}


def test_sentencepiece_trained_on_a_bounded_sample_is_deterministic(tmp_path, many_units):
    kwargs = dict(tokenizer="sentencepiece", vocab_size=400, sp_sample_mb=0.02, unit_mb=0.01, val_fraction=0.0, **QUIET)
    a = prepare(str(many_units), tmp_path / "a", workers=1, **kwargs)
    b = prepare(str(many_units), tmp_path / "b", workers=2, **kwargs)
    assert a["digest"] == b["digest"]
    assert a["tokenizer"]["fingerprint"] != prepare(str(many_units), tmp_path / "c", **{**kwargs, "seed": 1})["tokenizer"]["fingerprint"]


def test_a_later_phase_without_its_predecessor_is_refused(tmp_path, many_units):
    prepare(str(many_units), tmp_path / "out", phase="plan", **QUIET)
    with pytest.raises(RuntimeError, match="needs the earlier phase"):
        prepare(str(many_units), tmp_path / "out", phase="dedup", **QUIET)
    with pytest.raises(FileExistsError, match="other options"):
        prepare(str(many_units), tmp_path / "out", seed=5, **QUIET)


def test_version_1_datasets_still_load(tmp_path, dataset):
    old = tmp_path / "v1"
    shutil.copytree(dataset, old)
    manifest = read_manifest(old)
    manifest["version"] = 1
    for name, split in manifest["splits"].items():
        split["names"] = [n for n, _ in iter_documents(dataset, name)]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert next(iter(StreamingLoader(old, "train", 16, 2, epochs=1)))["input_ids"].shape == (2, 16)
    manifest["version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="re-run data_pipeline prepare"):
        StreamingLoader(old, "train", 16, 2)


# -- a killed prepare resumes ------------------------------------------------------------------------
def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@pytest.mark.integration
def test_killed_prepare_resumes_to_the_same_dataset(tmp_path, many_units, tokenizer_files):
    args = ["--source", str(many_units), "--tokenizer", str(tokenizer_files["hf"]), "--unit-mb", "0.002",
            "--shard-mb", "0.004", "--val-fraction", "0.2", "--dedup-partitions", "4", "--no-progress"]
    reference = prepare(str(many_units), tmp_path / "ref", tokenizer=str(tokenizer_files["hf"]), unit_mb=0.002,
                        shard_mb=0.004, val_fraction=0.2, dedup_partitions=4, **QUIET)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    first_done = partial / "_work" / "write" / "u000001.json"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", "prepare", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for(lambda: first_done.is_file() or proc.poll() is not None, 120, "the write phase to start")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed: give it more units"
    assert not out.exists()  # a half-written dataset never looks complete
    with pytest.raises(ShardError, match="not found"):
        read_manifest(out)
    done_before = {p.name: p.stat().st_mtime_ns for p in (partial / "_work" / "write").glob("u*.json")}
    assert 0 < len(done_before) < len(read_manifest_plan(partial)["units"])
    result = run_cli("-m", "data_pipeline", "prepare", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout
    assert manifest_digest(out) == reference["digest"]
    assert not partial.exists()


def read_manifest_plan(partial: Path) -> dict:
    return json.loads((partial / "plan.json").read_text())


def test_resume_redoes_only_unfinished_units(tmp_path, many_units):
    kwargs = dict(unit_mb=0.002, shard_mb=0.004, dedup_partitions=4, **QUIET)
    for phase in ("plan", "scan"):
        prepare(str(many_units), tmp_path / "out", phase=phase, **kwargs)
    scans = sorted((tmp_path / "out.partial" / "_work" / "scan").glob("u*.json"))
    assert len(scans) > 4
    scans[3].unlink()  # as if the job died while scanning unit 3
    stamps = {p: p.stat().st_mtime_ns for p in scans if p.exists()}
    prepare(str(many_units), tmp_path / "out", phase="scan", **kwargs)
    assert scans[3].is_file() and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    manifest = prepare(str(many_units), tmp_path / "out", **kwargs)  # the rest, resumed
    assert manifest["digest"] == prepare(str(many_units), tmp_path / "fresh", **kwargs)["digest"]
    assert not (tmp_path / "out.partial").exists()


def test_interrupted_finalize_and_lost_work_files_recover(tmp_path, many_units):
    kwargs = dict(unit_mb=0.002, shard_mb=0.004, dedup_partitions=4, **QUIET)
    fresh = prepare(str(many_units), tmp_path / "fresh", **kwargs)
    for phase in ("plan", "scan", "dedup", "tokenizer", "write"):
        prepare(str(many_units), tmp_path / "out", phase=phase, **kwargs)
    shutil.rmtree(tmp_path / "out.partial" / "_work" / "scan")  # a kill in the middle of clean-up
    assert prepare(str(many_units), tmp_path / "out", **kwargs)["digest"] == fresh["digest"]
    (tmp_path / "fresh" / "_work").mkdir()  # finished, but its work files were not all removed
    (tmp_path / "fresh" / "plan.json").write_text("{}")
    lines = []
    again = prepare(str(many_units), tmp_path / "fresh", **{**kwargs, "log": lines.append})
    assert again["digest"] == fresh["digest"] and any("already prepared" in line for line in lines)
    assert not (tmp_path / "fresh" / "_work").exists() and not (tmp_path / "fresh" / "plan.json").exists()


# -- training on it ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_model_trains_on_jsonl_with_a_pretrained_tokenizer_and_reports_bpb(tmp_path, many_units, tokenizer_files):
    data = tmp_path / "data"
    prepare(str(many_units), data, tokenizer=str(tokenizer_files["hf"]), val_fraction=0.2, shard_mb=0.002, **QUIET)
    run = tmp_path / "run"
    result = run_cli(*train_cmd(data, run, **{"train.eval_every": 6, "model.sliding_window": 0}))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("split") == "val"]
    assert evals and all(0 < r["bpb"] < 20 for r in evals)
    assert len(losses_by_step(run)) == 6
    config = (run / "config.yaml").read_text()
    assert "vocab_size: 512" in config  # the tokenizer's 400 ids, padded to a multiple of 128
