"""data.window_order=shuffled: each shard's windows in a seeded permutation, resumable exactly."""
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.loader import SlotStream, StreamingLoader
from data_pipeline.reshard import ReshardError
from data_pipeline.shards import iter_shard_documents, read_manifest
from data_pipeline.tokenizer import ByteTokenizer

SEQ, ROWS = 16, 3


def shard_windows(dataset, shard: str) -> list[bytes]:
    """The shard's EOS-joined documents cut into windows of SEQ + 1 tokens sharing one token."""
    stream = []
    for _, tokens in iter_shard_documents(dataset / shard, "uint16"):
        stream += tokens.tolist() + [ByteTokenizer.EOS]
    stream = np.array(stream, dtype=np.int64)
    return [stream[j * SEQ:j * SEQ + SEQ + 1].tobytes() for j in range((stream.size - 1) // SEQ)]


def rows_of(loader, n=None) -> list[torch.Tensor]:
    out = []
    for _, batch in zip(range(n) if n is not None else itertools.count(), loader):  # pulls no extra batch
        assert batch["input_ids"].shape == (ROWS, SEQ)
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        out.append(torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1))
    return out


def test_each_shard_window_appears_at_most_once_per_epoch_in_a_seeded_order(dataset):
    shards = [s["name"] for s in read_manifest(dataset)["splits"]["train"]["shards"]]
    expected = Counter(w for shard in shards for w in shard_windows(dataset, shard))
    loader = StreamingLoader(dataset, "train", SEQ, ROWS, seed=5, epochs=1, window_order="shuffled")
    got = [row.numpy().tobytes() for rows in rows_of(loader) for row in rows]
    assert not Counter(got) - expected, "a window came more often than the shards hold it"
    per_shard = sum(len(shard_windows(dataset, s)) // ROWS * ROWS for s in shards)
    assert len(got) == per_shard  # only each shard's last windows % ROWS are left out
    again = StreamingLoader(dataset, "train", SEQ, ROWS, seed=5, epochs=1, window_order="shuffled")
    assert [r.numpy().tobytes() for rows in rows_of(again) for r in rows] == got
    other = StreamingLoader(dataset, "train", SEQ, ROWS, seed=6, epochs=1, window_order="shuffled")
    assert [r.numpy().tobytes() for rows in rows_of(other) for r in rows] != got
    # rows of one batch are not consecutive stretches of the text, as they are with "stream"
    first = rows_of(StreamingLoader(dataset, "train", SEQ, ROWS, seed=5, window_order="shuffled"), 20)
    assert any(not torch.equal(b[i, -1], b[i + 1, 0]) for b in first for i in range(ROWS - 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_windows_resume_exactly(dataset, workers):
    k = 13  # mid-shard, and mid-item with 2 workers
    common = dict(world_size=2, num_workers=workers, seed=3, window_order="shuffled")
    for rank in range(2):
        uninterrupted = rows_of(StreamingLoader(dataset, "train", SEQ, ROWS, rank=rank, **common), k + 30)
        first = StreamingLoader(dataset, "train", SEQ, ROWS, rank=rank, **common)
        rows_of(first, k)
        resumed = StreamingLoader(dataset, "train", SEQ, ROWS, rank=rank, **common)
        resumed.load_state_dict(first.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted[k:], rows_of(resumed, 30))), rank


def test_window_order_is_part_of_the_layout(dataset):
    stream = StreamingLoader(dataset, "train", SEQ, ROWS, world_size=2, num_workers=2)
    shuffled = StreamingLoader(dataset, "train", SEQ, ROWS, world_size=2, num_workers=2,
                               window_order="shuffled")
    rows_of(stream, 2)
    with pytest.raises(ValueError, match="window_order=stream.*window_order=shuffled"):
        shuffled.load_state_dict(stream.state_dict())
    old = stream.state_dict()
    del old["layout"]["window_order"]  # saved before the key existed: the stream order
    StreamingLoader(dataset, "train", SEQ, ROWS, world_size=2, num_workers=2).load_state_dict(old)
    one_rank = StreamingLoader(dataset, "train", SEQ, ROWS, num_workers=2, window_order="shuffled")
    rows_of(shuffled, 2)
    with pytest.raises(ReshardError, match="window_order=shuffled"):
        one_rank.reshard_from([shuffled.state_dict()])
    with pytest.raises(ValueError, match="window_order='random'"):
        StreamingLoader(dataset, "train", SEQ, ROWS, window_order="random")


def test_a_slot_stream_without_the_key_in_its_state_starts_at_window_0(dataset):
    loader = StreamingLoader(dataset, "train", SEQ, ROWS, seed=1, window_order="shuffled")
    batch, state = next(SlotStream(loader.spec, 0, None).batches())
    assert batch.shape == (ROWS, SEQ + 1) and state["window_pos"] == ROWS


def test_shards_too_short_for_one_batch_are_an_error_not_a_hang(dataset):
    """Training streams never end; with no shard able to fill a batch the loader would spin."""
    loader = StreamingLoader(dataset, "train", 512, 64, window_order="shuffled")
    with pytest.raises(ValueError, match="no shard of this slot holds 64 windows of 512 tokens"):
        next(iter(loader))
