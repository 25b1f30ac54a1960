"""Training data from object storage: real HTTP and S3-compatible servers on 127.0.0.1, shards
checked before use, retries through outages, exact resume, a bounded shared cache, no secrets
written anywhere."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.loader import StreamingLoader
from data_pipeline.prepare import prepare
from data_pipeline.shards import ShardError, read_manifest
from data_pipeline.storage import DataStore, StoreError, StoreOptions, evict
from pretrain.bench.servers import HttpStore, S3Store

from helpers import losses_by_step, run_cli, train_cmd

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """600 short documents in ~512-token shards: a few training steps cross several shards."""
    root = tmp_path_factory.mktemp("remote")
    lines = ["To be, or not to be, that is the question:", "naïve café — ünïcödé ✓ 日本語",
             "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"]
    rng = np.random.default_rng(0)
    for part in range(6):
        with open(root / f"part-{part}.jsonl", "w") as f:
            for i in range(100):
                text = " ".join(lines[j] for j in rng.integers(0, len(lines), size=4)) + f" [{part}.{i}]"
                f.write(json.dumps({"text": text}) + "\n")
    out = root / "ds"
    prepare(str(root), out, val_fraction=0.2, shard_mb=0.001, **QUIET)
    return out


@pytest.fixture
def http_store(small_shards):
    server = HttpStore(small_shards)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_store(small_shards):
    server = S3Store(small_shards)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def default_store_options():
    yield
    storage.configure(StoreOptions())


def batches(data, **kw) -> list[np.ndarray]:
    return [b["input_ids"].numpy() for b in StreamingLoader(data, "train", 32, 2, epochs=1, **kw)]


# -- in-process: the loader against real servers -----------------------------------------------------
def test_loader_reads_http_and_s3_like_local_disk(small_shards, http_store, s3_store, monkeypatch):
    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    local = batches(small_shards)
    assert all(np.array_equal(a, b) for a, b in zip(batches(http_store.url), local, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(batches(s3_store.url), local, strict=True))


def test_a_transfer_cut_halfway_is_retried(small_shards, http_store):
    storage.configure(StoreOptions(retries=3, backoff_s=0.05))
    http_store.cut_next = 2
    got = batches(http_store.url)
    assert http_store.on_cut.is_set() and http_store.cut_next == 0
    assert all(np.array_equal(a, b) for a, b in zip(got, batches(small_shards), strict=True))


def test_a_store_that_stays_down_is_one_line_naming_the_url(small_shards, http_store):
    storage.configure(StoreOptions(retries=2, backoff_s=0.01))
    loader = iter(StreamingLoader(http_store.url, "train", 32, 2, epochs=1))
    next(loader)
    http_store.stop()
    with pytest.raises(StoreError) as err:
        list(loader)
    message = str(err.value)
    assert "\n" not in message and http_store.url in message and "unreachable after 3 attempts" in message


def _altered(src: Path, dst: Path, how: str, every: int = 0) -> str:
    """A copy of the dataset with its first train shard (and every ``every``-th) altered;
    returns the first one's name."""
    import shutil

    shutil.copytree(src, dst)
    names = [s["name"] for s in read_manifest(dst)["splits"]["train"]["shards"]]
    for name in names[::every] if every else names[:1]:
        data = bytearray((dst / name).read_bytes())
        tokens = 512 * 3  # tar: the json member (header + one data block), the tok member's header
        if how == "out_of_range":
            data[tokens:tokens + 8] = b"\xff" * 8  # ids 65535: outside the 258 of the byte tokenizer
        else:
            data[tokens + 20] = (data[tokens + 20] + 1) % 256  # a low byte: another valid byte id
        (dst / name).write_bytes(bytes(data))
    return names[0]


@pytest.mark.parametrize("how", ["out_of_range", "valid"])
@pytest.mark.parametrize("where", ["local", "http"])
def test_an_altered_shard_never_reaches_a_batch(tmp_path, small_shards, how, where):
    data = tmp_path / "copy"
    victim = _altered(small_shards, data, how)
    server = HttpStore(data) if where == "http" else None
    try:
        root = server.url if server else data
        with pytest.raises(ShardError, match=f"{victim}: sha256 differs"):
            batches(root)
        loader = StreamingLoader(root, "train", 32, 2, epochs=1, on_error="skip")
        got = [b["input_ids"].numpy() for b in loader]
        assert loader.skipped_shards == 1 and got
    finally:
        if server:
            server.stop()


def test_ids_outside_the_vocabulary_are_refused_even_with_a_matching_checksum(tmp_path, small_shards):
    import hashlib

    data = tmp_path / "copy"
    victim = _altered(small_shards, data, "out_of_range")
    manifest = read_manifest(data)
    for shard in manifest["splits"]["train"]["shards"]:
        if shard["name"] == victim:  # a manifest rewritten to match: the range check still holds
            shard["sha256"] = hashlib.sha256((data / victim).read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="outside the tokenizer's 258 ids"):
        batches(data)


# -- the cache -------------------------------------------------------------------------------------
def test_cache_is_reused_shared_by_two_workers_and_bounded(tmp_path, small_shards, http_store):
    cache = tmp_path / "cache"
    storage.configure(StoreOptions(cache_dir=str(cache), cache_gb=1.0))
    reference = batches(small_shards, num_workers=2)
    first = batches(http_store.url, num_workers=2)  # two worker processes filling one cache
    fetched = http_store.shard_requests()
    shards = {s["name"] for s in read_manifest(small_shards)["splits"]["train"]["shards"]}
    assert fetched == len(shards)  # each shard once
    assert all(np.array_equal(a, b) for a, b in zip(first, reference, strict=True))
    again = batches(http_store.url, num_workers=2)
    assert http_store.shard_requests() == fetched  # a second run downloads nothing
    assert all(np.array_equal(a, b) for a, b in zip(again, reference, strict=True))
    cached = sorted(cache.glob("*/*.tar"))
    assert len(cached) == len(shards) and not list(cache.glob("*/.*.tmp"))
    sizes = [p.stat().st_size for p in cached]
    bound = sum(sizes) // 2
    left = evict(cache, bound)
    assert left <= bound and len(list(cache.glob("*/*.tar"))) < len(shards)
    storage.configure(StoreOptions(cache_dir=str(cache), cache_gb=bound / 2**30))
    batches(http_store.url)  # refills past the bound as it goes: eviction keeps it there
    assert sum(p.stat().st_size for p in cache.glob("*/*.tar")) <= bound + max(sizes)


def test_a_damaged_cache_entry_is_fetched_again(tmp_path, small_shards, http_store):
    cache = tmp_path / "cache"
    storage.configure(StoreOptions(cache_dir=str(cache)))
    reference = batches(http_store.url)
    for path in cache.glob("*/*.tar"):
        path.write_bytes(b"garbage")
    assert all(np.array_equal(a, b) for a, b in zip(batches(http_store.url), reference, strict=True))


def test_credentials_in_data_path_are_refused():
    from pretrain.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="must not hold credentials"):
        load_config(None, ["data.path=https://user:secret@example.invalid/data"])
    assert DataStore("https://u:p@127.0.0.1/x").where("m.json") == "https://127.0.0.1/x/m.json"


# -- training runs ---------------------------------------------------------------------------------
RUN = {"train.steps": 12, "train.checkpoint_every": 2, "train.log_every": 1, "model.sliding_window": 0}


def _train(data, run_dir, env=None, **extra):
    return run_cli(*train_cmd(data, run_dir, **{**RUN, **extra}), env_extra=env)


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory, small_shards) -> dict[int, float]:
    run = tmp_path_factory.mktemp("local-run") / "run"
    result = _train(small_shards, run)
    assert result.returncode == 0, result.stderr[-2000:]
    return losses_by_step(run)


@pytest.mark.integration
def test_training_from_http_and_s3_equals_local_disk(tmp_path, local_losses, http_store, s3_store):
    secret = s3_store.env["AWS_SECRET_ACCESS_KEY"]
    for name, url, env in (("http", http_store.url, None), ("s3", s3_store.url, s3_store.env)):
        run = tmp_path / name
        result = _train(url, run, env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert losses_by_step(run) == local_losses, name
        leaked = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaked and secret not in result.stdout + result.stderr  # never written or printed


@pytest.mark.integration
def test_outage_within_the_retry_budget_is_ridden_out(tmp_path, local_losses, http_store):
    """The server dies in the middle of a shard and comes back 2 s later: the run goes on."""
    http_store.cut_next = 1

    def outage():
        http_store.on_cut.wait(120)
        http_store.stop()
        threading.Timer(2.0, http_store.start).start()
    threading.Thread(target=outage, daemon=True).start()
    run = tmp_path / "run"
    result = _train(http_store.url, run, **{"data.retries": 8, "data.retry_backoff_s": 0.25})
    assert result.returncode == 0, result.stderr[-2000:]
    assert http_store.on_cut.is_set()
    assert losses_by_step(run) == local_losses


@pytest.mark.integration
def test_outage_past_the_retry_budget_stops_and_resumes_exactly(tmp_path, local_losses, http_store):
    http_store.cut_next = 0
    requests_before_outage = 4  # a few shards in: after a checkpoint, before the end

    def outage():
        while http_store.shard_requests() < requests_before_outage:
            if stop.wait(0.01):
                return
        http_store.stop()
    stop = threading.Event()
    threading.Thread(target=outage, daemon=True).start()
    run = tmp_path / "run"
    settings = {"data.retries": 2, "data.retry_backoff_s": 0.05}
    result = _train(http_store.url, run, **settings)
    stop.set()
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and http_store.url in last and "unreachable" in last
    assert "Traceback" not in result.stderr
    assert (run / "checkpoints" / "latest").is_file()
    http_store.start()  # the store is back: the same command resumes
    result = _train(http_store.url, run, **settings)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout + result.stderr
    assert losses_by_step(run) == local_losses


@pytest.mark.integration
def test_an_altered_shard_stops_training_in_one_line_or_is_skipped(tmp_path, small_shards):
    data = tmp_path / "copy"
    _altered(small_shards, data, "valid", every=2)  # training meets one within a few steps
    result = _train(data, tmp_path / "raise")
    assert result.returncode == 2 and "sha256 differs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and ".tar" in result.stderr
    assert "Traceback" not in result.stderr
    result = _train(data, tmp_path / "skip", **{"data.on_error": "skip"})
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("data_skipped_shards", 0) for r in records) >= 1


@pytest.mark.integration
def test_bench_data_compares_local_http_and_s3(tmp_path, small_shards):
    out = tmp_path / "bench"
    result = run_cli("-m", "pretrain", "bench", "data", "--data", str(small_shards), "--remote", "--out", str(out),
                     "--seq-len", "32", "--micro-batch", "2", "--seconds", "0.3", "--rounds", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["store"], r["workers"]) for r in runs} == {(s, w) for s in ("local", "http", "s3") for w in (1, 2)}
    assert all(r["mb_per_s"] > 0 for r in runs)
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") is None or "bench-secret-key" not in result.stdout
