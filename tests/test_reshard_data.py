"""The loader re-split across a data-parallel or worker change: every document exactly once.

Each document is one printable byte repeated (a different byte per document), so counting each
byte value over every batch's input ids counts how many of that document's tokens were trained
on: exactly its length, whatever the layouts and wherever the change fell."""
import io
from collections import Counter

import pytest
import torch

from data_pipeline.loader import StreamingLoader
from data_pipeline.prepare import prepare
from data_pipeline.reshard import ReshardError

SEQ, ROWS = 8, 2  # a finite epoch drops at most its last SEQ * ROWS tokens per slot


@pytest.fixture(scope="module")
def one_byte_documents(tmp_path_factory):
    root = tmp_path_factory.mktemp("bytes_corpus")
    lengths = {}
    for i, value in enumerate(range(33, 127)):  # printable ASCII: one document each
        length = 40 + (i * 37) % 300
        (root / f"d{i:03d}.txt").write_bytes(bytes([value]) * length)
        lengths[value] = length
    out = tmp_path_factory.mktemp("bytes_data") / "ds"
    prepare(str(root), out, val_fraction=0.0, shard_mb=0.002, log=lambda *_: None)
    return out, lengths


def _loader(data, world, workers, rank, shuffle_buffer, epochs=1):
    return StreamingLoader(data, "train", SEQ, ROWS, rank=rank, world_size=world, num_workers=workers,
                           seed=5, shuffle_buffer=shuffle_buffer, epochs=epochs)


def _count(batches, counts: Counter) -> int:
    n = 0
    for batch in batches:
        counts.update(batch["input_ids"].flatten().tolist())
        n += 1
    return n


def _saved(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)  # as a checkpoint stores it
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("shuffle_buffer", [0, 3])
@pytest.mark.parametrize("old,new", [((2, 2), (1, 1)), ((2, 1), (1, 2)), ((1, 1), (2, 2))],
                         ids=["dp2w2-dp1w1", "dp2w1-dp1w2", "dp1w1-dp2w2"])
def test_a_layout_change_mid_epoch_reads_every_document_once(one_byte_documents, old, new, shuffle_buffer):
    data, lengths = one_byte_documents
    counts: Counter = Counter()
    saved = []
    for rank in range(old[0]):
        loader = _loader(data, *old, rank, shuffle_buffer)
        it = iter(loader)
        _count((next(it) for _ in range(7)), counts)  # mid-epoch, mid-document
        del it
        saved.append(_saved(loader.state_dict()))
    assert sum(counts[v] for v in lengths) > 0
    lines = set()
    for rank in range(new[0]):
        loader = _loader(data, *new, rank, shuffle_buffer)
        assert not loader.same_layout(saved[rank % len(saved)])
        lines.add(loader.reshard_from(saved))
        _count(loader, counts)  # to the end of the (finite) epoch
    assert len(lines) == 1  # every new rank computes the same re-split
    assert ("world_size" in lines.pop()) == (old[0] != new[0])
    over = {chr(v): counts[v] - n for v, n in lengths.items() if counts[v] > n}
    assert not over, f"documents repeated: {over}"
    short = {chr(v): n - counts[v] for v, n in lengths.items() if counts[v] < n}
    slots = new[0] * new[1]
    # only the last, partial batch of each new slot is left out (documents are >= 40 tokens)
    assert sum(short.values()) <= slots * SEQ * ROWS and len(short) <= slots, short


def test_later_epochs_follow_the_new_layout(one_byte_documents):
    """Two epochs, the change in the first: the first completes once, the second is whole."""
    data, lengths = one_byte_documents
    counts: Counter = Counter()
    saved = []
    for rank in range(2):
        loader = _loader(data, 2, 1, rank, 0, epochs=2)
        it = iter(loader)
        _count((next(it) for _ in range(5)), counts)
        del it
        saved.append(_saved(loader.state_dict()))
    loader = _loader(data, 1, 2, 0, 0, epochs=2)
    loader.reshard_from(saved)
    _count(loader, counts)
    short = {v: 2 * n - counts[v] for v, n in lengths.items() if counts[v] != 2 * n}
    assert all(0 < s for s in short.values()), "documents repeated"
    assert sum(short.values()) <= 2 * SEQ * ROWS and len(short) <= 2, short


def test_a_resharded_loader_resumes_exactly_and_reshards_again(one_byte_documents):
    """A checkpoint taken while the carried-over work is read resumes exactly, and a second
    change in the middle of it still reads every document once."""
    data, lengths = one_byte_documents
    saved = []
    for rank in range(2):
        loader = _loader(data, 2, 1, rank, 3)
        it = iter(loader)
        next(it), next(it), next(it)
        del it
        saved.append(_saved(loader.state_dict()))
    first = _loader(data, 1, 1, 0, 3)
    first.reshard_from(saved)
    uninterrupted = [b["input_ids"] for b in first]
    again = _loader(data, 1, 1, 0, 3)
    again.reshard_from(saved)
    it = iter(again)
    head = [next(it)["input_ids"] for _ in range(4)]
    del it
    resumed = _loader(data, 1, 1, 0, 3)
    assert resumed.same_layout(again.state_dict())
    resumed.load_state_dict(_saved(again.state_dict()))
    tail = [b["input_ids"] for b in resumed]
    assert len(head + tail) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, uninterrupted))


def test_a_changed_seed_or_missing_rank_is_refused(one_byte_documents):
    data, _ = one_byte_documents
    saved = [_saved(_loader(data, 2, 1, rank, 0).state_dict()) for rank in range(2)]
    other_seed = StreamingLoader(data, "train", SEQ, ROWS, world_size=1, seed=6, epochs=1)
    with pytest.raises(ReshardError, match="seed=5.*seed=6"):
        other_seed.reshard_from(saved)
    with pytest.raises(ReshardError, match=r"ranks \[1\] are missing"):
        _loader(data, 1, 1, 0, 0).reshard_from(saved[:1])


@pytest.mark.integration
def test_training_resumes_with_another_worker_count(dataset, tmp_path):
    """`pretrain train` re-run with data.num_workers 2 -> 0 continues, saying what it re-split."""
    from helpers import losses_by_step, run_cli, train_cmd

    run_dir = tmp_path / "run"
    first = run_cli(*train_cmd(dataset, run_dir, **{"train.steps": 4, "train.checkpoint_every": 4,
                                                    "data.num_workers": 2}))
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_cli(*train_cmd(dataset, run_dir, **{"train.steps": 8, "train.checkpoint_every": 4,
                                                      "data.num_workers": 0}))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = resumed.stdout + resumed.stderr
    assert "at step 4" in out and "data loader resharded (num_workers 2 -> 0)" in out, out[-3000:]
    assert sorted(losses_by_step(run_dir)) == list(range(1, 9))
