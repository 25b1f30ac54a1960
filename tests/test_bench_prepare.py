"""bench prepare: the corpus it makes from shipped text (deterministic, cached, valid UTF-8 JSONL of
1-20 KiB documents), and the whole benchmark in --quick mode: every run, the derived numbers, the
provenance, and the cross-checks between ours and datatrove."""
import json
from pathlib import Path

import orjson
import pytest

from pretrain.bench.prepare import make_corpus

from helpers import run_cli


def test_corpus_is_seeded_cached_and_valid_jsonl(tmp_path):
    logs = []
    a = make_corpus(tmp_path / "a", 0.5, 0.125, seed=3, log=logs.append)
    b = make_corpus(tmp_path / "b", 0.5, 0.125, seed=3, log=logs.append)
    c = make_corpus(tmp_path / "c", 0.5, 0.125, seed=4, log=logs.append)
    assert a["digest"] == b["digest"] != c["digest"]
    assert len(a["files"]) == 4 and a["bytes"] >= 0.5 * 2**20
    assert a["bytes"] == sum(f["bytes"] for f in a["files"])
    sizes = []
    for f in a["files"]:
        lines = (Path(a["path"]) / f["name"]).read_bytes().splitlines()
        assert len(lines) == f["documents"]
        sizes += [len(orjson.loads(line)["text"].encode("utf-8")) for line in lines]
    assert sum(sizes) == a["text_bytes"]
    assert 1024 - 4 <= min(sizes) and max(sizes) <= 20 * 1024 + 4   # ends snap to character starts
    data = Path(a["path"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    again = make_corpus(tmp_path / "a", 0.5, 0.125, seed=3, log=logs.append)
    assert again["digest"] == a["digest"] and logs[-1].startswith("corpus: reusing")
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == mtimes


@pytest.mark.integration
def test_bench_prepare_quick_runs_ours_and_datatrove_and_records_everything(tmp_path):
    out, cache = tmp_path / "bench", tmp_path / "cache"
    done = run_cli("-m", "pretrain", "bench", "prepare", "--quick", "--out", str(out), "--work", str(cache), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["benchmark"] == "prepare" and "--quick" in r["command"]
    assert r["commit"] and r["date"] and r["hardware"]["cpus"] >= 1
    assert r["corpus"]["bytes"] >= 2 * 2**20 and r["corpus"]["files"] == 8
    assert set(r["tokenizers"]) == {"bytes", "sentencepiece", "hf"}

    keys = {(x["tool"], x["tokenizer"], x["workers"], x["corpus"]) for x in r["runs"]}
    assert keys == {("ours", t, w, "full") for t in ("bytes", "sentencepiece", "hf") for w in (1, 2)} | \
        {("datatrove", "hf", w, "full") for w in (1, 2)} | {("ours", "bytes", 1, "1x")}
    for x in r["runs"]:
        for field in ("tool", "tokenizer", "workers", "corpus_mb", "wall_s", "mb_per_s", "mb_per_s_per_worker",
                      "peak_rss_mb", "cpu_s"):
            assert field in x, field
        assert x["rc"] == 0 and x["wall_s"] > 0 and x["peak_rss_mb"] > 10 and x["rss_samples"] >= 1
        assert x["mb_per_s"] == pytest.approx(x["corpus_mb"] / x["wall_s"])
        assert x["mb_per_s_per_worker"] == pytest.approx(x["mb_per_s"] / x["workers"])
        if x["corpus"] == "full":
            assert x["corpus_mb"] == pytest.approx(r["corpus"]["bytes"] / 1e6)
        if x["workers"] == 2:  # the tree is sampled: the parent and both workers seen at least
            assert x["processes_seen"] >= 3 and 1 <= x["processes_max"] <= x["processes_seen"]
        if x["tool"] == "ours":
            assert x["documents"] == r["corpus"]["documents"] or x["corpus"] == "1x"
            assert x["dropped_not_lossless"] == 0 and x["duplicates_removed"] == 0
            assert set(x["phases_s"]) == {"scan", "write"}

    d = r["derived"]
    by = {(x["tool"], x["tokenizer"], x["workers"]): x for x in r["runs"] if x["corpus"] == "full"}
    assert set(d["speedup"]) == {"ours/bytes", "ours/sentencepiece", "ours/hf", "datatrove/hf"}
    for key, s in d["speedup"].items():
        tool, tok = key.split("/")
        assert s["speedup"] == pytest.approx(by[(tool, tok, 1)]["wall_s"] / by[(tool, tok, 2)]["wall_s"])
    for w in (1, 2):
        ratio = by[("ours", "hf", w)]["mb_per_s_per_worker"] / by[("datatrove", "hf", w)]["mb_per_s_per_worker"]
        assert d["ours_over_datatrove_per_worker"][str(w)] == pytest.approx(ratio)
        assert d["tokens_check"][str(w)]["equal"]   # same tokenizer.json, same documents: same tokens (+ EOS)
    assert d["digest_same_across_workers"] == {"bytes": True, "sentencepiece": True, "hf": True}
    s = d["rss_scaling"]
    assert s["corpus_mb_4x"] == pytest.approx(4 * s["corpus_mb_1x"], rel=0.02)
    assert s["rss_4x_over_1x"] == pytest.approx(s["rss_4x_mb"] / s["rss_1x_mb"])
    assert s["target_met"] == (s["rss_4x_over_1x"] <= 1.25)
    assert "speedup 2 over 1 workers" in done.stdout and "ours / datatrove" in done.stdout
    assert (out / "table.txt").is_file()

    # the knobs, and the cache: a second run reuses the corpus and tokenizers
    again = run_cli("-m", "pretrain", "bench", "prepare", "--quick", "--out", str(tmp_path / "again"), "--work", str(cache),
                    "--tokenizers", "bytes,hf", "--workers", "1", "--no-datatrove", "--no-rss-scaling", timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "corpus: reusing" in again.stdout and "tokenizers: trained" not in again.stdout
    runs = json.loads((tmp_path / "again" / "results.json").read_text())["runs"]
    assert [(x["tool"], x["tokenizer"], x["workers"]) for x in runs] == [("ours", "bytes", 1), ("ours", "hf", 1)]
    for x in runs:
        assert x["manifest_digest"] == by[("ours", x["tokenizer"], 1)]["manifest_digest"]
