"""bench compare: statistics, claim verdicts and the report on fabricated results; reuse of
finished runs on a real (tiny) comparison."""
import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from scipy import stats as sps

from pretrain.research import stats
from pretrain.research.compare_report import render

from helpers import ROOT, run_cli


def test_summary_and_welch_match_scipy():
    a, b = [2.61, 2.64, 2.59, 2.66], [2.70, 2.74, 2.69]
    s = stats.summarize(a)
    assert s["mean"] == pytest.approx(sum(a) / 4)
    assert s["std"] == pytest.approx(math.sqrt(sum((x - s["mean"]) ** 2 for x in a) / 3))
    w = stats.welch(a, b)
    va, vb = s["std"] ** 2 / 4, stats.summarize(b)["std"] ** 2 / 3
    t = (s["mean"] - stats.summarize(b)["mean"]) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)       # Welch-Satterthwaite
    assert w["t"] == pytest.approx(t)
    assert w["p"] == pytest.approx(2 * sps.t.sf(abs(t), df))
    assert w["p"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert stats.welch([1.0], b) == {"t": None, "p": None}
    assert stats.summarize([3.0])["std"] == 0.0


def fabricated(fim_exp=1.1, dense_exp=1.9, base_spt=1e-4, fim_spt=1.2e-4, base_acc=(0.0, 0.0),
               fim_acc=(0.0, 0.0), fim_bits_scale=1.0) -> dict:
    def arm(name, model, spt, acc, bpb, bits=(3.4375, 4.8125)):
        # per-seed answer bits: +-0.0625 around the arm's value (the tests need a variance)
        runs = [{"seed": s, "run_dir": f"runs/{name}-{s}", "reused": False, "bpb": bpb[s],
                 "tokens": 1000, "elapsed_s": spt * 1000, "seconds_per_token": spt,
                 "tokens_per_s": 1 / spt, "mfu": 0.5, "peak_mem_mb": 500.0,
                 "curve": [{"tokens": 0, "bpb": 8.1}, {"tokens": 1000, "bpb": bpb[s]}],
                 "tasks": {"contexts": [128], "passkey": {"128": acc[0]}, "mqar": {"128": acc[1]},
                           "answer_bits": {"passkey": {"128": bits[0] + (2 * s - 1) / 16},
                                           "mqar": {"128": bits[1] + (2 * s - 1) / 16}}}}
                for s in range(2)]
        out = {"name": name, "config": f"configs/{name}.yaml", "model": model, "params": 3210000,
               "flops_per_token": 2.0e7 if model == "mistral" else 1.9e7,
               "training_flops": 2.0e10, "runs": runs}
        for key in ("bpb", "seconds_per_token", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"):
            out[key] = stats.summarize([r[key] for r in runs])
        out["tasks"] = {t: {"accuracy": stats.summarize([acc[i]] * 2),
                            "by_context": {"128": stats.summarize([acc[i]] * 2)},
                            "bits_by_context": {"128": stats.summarize(
                                [r["tasks"]["answer_bits"][t]["128"] for r in runs])}}
                        for i, t in enumerate(("passkey", "mqar"))}
        return out

    fim_bits = (3.4375 * fim_bits_scale, 4.8125 * fim_bits_scale)
    arms = {"mistral": arm("mistral", "mistral", base_spt, base_acc, [2.65, 2.69]),
            "fim_mistral": arm("fim_mistral", "fim_mistral", fim_spt, fim_acc, [2.71, 2.76], fim_bits)}
    arms["fim_mistral"]["welch_bpb"] = stats.welch(arms["fim_mistral"]["bpb"]["values"],
                                                   arms["mistral"]["bpb"]["values"])
    points = [{"n": n, "fwd_bwd_ms": n / 100, "peak_mb": 10.0} for n in (1024, 2048, 4096)]
    results = {"benchmark": "compare", "command": "python -m pretrain bench compare ...",
               "commit": "abc1234", "date": "2026-11-23 12:00 UTC",
               "hardware": {"machine": "x86_64", "processor": "x86_64", "cpus": 2,
                            "torch": "2.13.0+cpu", "gpu": None},
               "baseline": "mistral", "variants": ["fim_mistral"], "claims_arm": "fim_mistral",
               "seeds": 2, "tokens": 1000, "contexts": [128, 256], "arms": arms,
               "attention": {"device": "cpu", "fit_range": [1024, 4096],
                             "shape": {"batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 64,
                                       "window": 4096, "block": 64, "branching": 4, "top_k": 2,
                                       "dtype": "float32"},
                             "methods": {"dense": {"exponent": dense_exp, "points": points},
                                         "fim": {"exponent": fim_exp, "points": points}}},
               "inspect_attention_png": "fim_attention.png", "total_minutes": 12.5}
    results["claims"] = stats.claim_verdicts(results)
    return results


def verdicts(results) -> dict:
    return {c["claim"]: c["verdict"] for c in results["claims"]}


def test_claim_verdicts_follow_the_thresholds():
    v = verdicts(fabricated())
    assert v["O(N log N) attention"] == stats.SUPPORTED
    assert v["40-60% compute reduction"] == stats.NOT_SUPPORTED          # 20% slower
    assert v["25-40% better retrieval (passkey)"] == stats.NOT_SUPPORTED  # both at zero, same bits
    assert v["interpretability"] == stats.NOT_MEASURABLE

    # both at zero accuracy: judged on answer bits, 30% fewer with p < 0.05 (mqar: 4.8 -> 3.4 bits)
    v = verdicts(fabricated(fim_bits_scale=0.7))
    assert v["25-40% better retrieval (passkey)"] == stats.SUPPORTED
    v = verdicts(fabricated(fim_bits_scale=0.8))                         # 20% fewer: under the claim
    assert v["25-40% better retrieval (mqar)"] == stats.NOT_SUPPORTED
    no_bits = fabricated()
    for arm in no_bits["arms"].values():
        for run in arm["runs"]:
            del run["tasks"]["answer_bits"]
    no_bits["claims"] = stats.claim_verdicts(no_bits)
    assert verdicts(no_bits)["25-40% better retrieval (passkey)"] == stats.NOT_MEASURABLE

    v = verdicts(fabricated(fim_exp=1.35, fim_spt=0.5e-4, base_acc=(0.4, 0.2), fim_acc=(0.52, 0.22)))
    assert v["O(N log N) attention"] == stats.NOT_SUPPORTED
    assert v["40-60% compute reduction"] == stats.SUPPORTED              # 50% less time per token
    assert v["25-40% better retrieval (passkey)"] == stats.SUPPORTED     # +30%
    assert v["25-40% better retrieval (mqar)"] == stats.NOT_SUPPORTED    # +10%

    v = verdicts(fabricated(fim_spt=0.61e-4, base_acc=(0.0, 0.0), fim_acc=(0.3, 0.0)))
    assert v["40-60% compute reduction"] == stats.NOT_SUPPORTED          # 39%: under the claim
    assert v["25-40% better retrieval (passkey)"] == stats.SUPPORTED     # from nothing to 30%
    missing = fabricated()
    missing["attention"]["methods"]["fim"]["exponent"] = None
    missing["claims"] = stats.claim_verdicts(missing)
    assert verdicts(missing)["O(N log N) attention"] == stats.NOT_MEASURABLE


def _values(obj):
    """Every number in a results tree, including those inside strings."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, str):
        for tok in re.findall(r"\d[\d,]*\.?\d*(?:e[+-]?\d+)?", obj):
            yield float(tok.replace(",", "").rstrip("."))


def test_every_number_in_the_report_is_in_results_json():
    results = json.loads(json.dumps(fabricated()))  # as written to disk
    report = render(results)
    for section in ("## Setup", "## Results", "### Retrieval", "### Attention scaling",
                    "## Claims of the FIM design document", "## Reproduce", "bpb_vs_tokens.png",
                    "tasks.png", "attention_scaling.png", "fim_attention.png"):
        assert section in report
    assert "| mistral | passkey bits | 3.44 ± 0.09 | n/a (> seq length) |" in report
    known = list(_values(results))
    prose = re.sub(r"!\[[^]]*\]\([^)]*\)|`[^`]*`", "", report)  # image links, code (paths)
    for tok in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?%?", prose):
        number = tok.rstrip("%")
        decimals = len(number.split(".")[1].split("e")[0]) if "." in number else 0
        value = float(number.replace(",", ""))
        scales = (1, 100) if tok.endswith("%") else (1,)  # a fraction shown as a percentage
        assert any(math.isclose(round(k * scale, decimals), value, abs_tol=10 ** -decimals / 2)
                   or (("e" in number) and math.isclose(k, value, rel_tol=1e-3))
                   for k in known for scale in scales), f"{tok} in the report is not in results.json"
    changed = copy.deepcopy(results)
    changed["arms"]["mistral"]["bpb"]["mean"] = 9.8765
    assert "9.8765" in render(changed)


def test_a_comparison_without_a_fim_arm_reports_no_fim_claims_and_shows_level_losses():
    """Arms of other families: no attention scaling or FIM claims (they are the FIM document's);
    a FractalFormer arm's per-level training losses get their own table, from results.json."""
    results = json.loads(json.dumps(fabricated()))
    arm = results["arms"].pop("fim_mistral")
    arm.update(name="fractalformer", model="fractalformer")
    for run in arm["runs"]:
        run["level_losses"] = {"loss_level0": 1.2345, "loss_level1": 1.3456, "loss_level2": 1.5678}
    results["arms"]["fractalformer"] = arm
    results.update(variants=["fractalformer"], claims_arm=None, attention=None, claims=[],
                   inspect_attention_png=None)
    report = render(results)
    for absent in ("### Attention scaling", "## Claims", "fim_attention.png"):
        assert absent not in report
    assert "### Nested models: training loss per level" in report
    assert "| fractalformer | 1 | 1.2345 | 1.3456 | 1.5678 |" in report


@pytest.mark.integration
def test_rerunning_a_comparison_reuses_finished_runs(dataset, tmp_path):
    args = ["-m", "pretrain", "bench", "compare", "--baseline", str(ROOT / "configs" / "mistral_tiny.yaml"),
            "--variant", str(ROOT / "configs" / "fim_mistral_tiny.yaml"), "--seeds", "1",
            "--tokens", "1024", "--out", str(tmp_path / "report"), "--runs-dir", str(tmp_path / "runs"),
            "--contexts", "128", "--attention-max-n", "512", "--attention-fit", "256", "512"]
    for key, value in {"data.path": dataset, "model.num_layers": 2, "model.hidden_size": 64,
                       "model.num_attention_heads": 4, "model.num_query_groups": 2,
                       "model.ffn_hidden_size": 128, "model.seq_length": 128,
                       "model.sliding_window": 64, "model.fim.block_size": 16,
                       "train.micro_batch_size": 4, "train.eval_batches": 2,
                       "optim.warmup_steps": 1}.items():
        args += ["--set", f"{key}={value}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["reused"] for a in results["arms"].values() for r in a["runs"]] == [False, False]
    assert (tmp_path / "report" / "report.md").is_file()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--- training" not in again.stdout
    assert "--- attention scaling: reused" in again.stdout  # same code, settings and machine
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["reused"] for a in results["arms"].values() for r in a["runs"]] == [True, True]


def test_an_arm_can_be_a_config_plus_overrides():
    from pretrain.research.compare import split_arm

    assert split_arm("configs/him_tiny.yaml") == ("configs/him_tiny.yaml", [])
    assert split_arm("configs/him_tiny.yaml:model.him.cognitive=false,optim.lr=0.001") == (
        "configs/him_tiny.yaml", ["model.him.cognitive=false", "optim.lr=0.001"])


def test_the_lr_control_report_states_direction_significance_and_pbts_compute(tmp_path):
    """bench control's report from fabricated results: every arm's held-out mean ± std, the
    verdict's direction and Welch p from the numbers, PBT's total tokens = population x tokens."""
    from pretrain.research.control_report import write_report

    def run(heldout, val, decisions=()):
        return {"heldout_bpb": heldout, "val_bpb": val, "curve": [{"step": 0, "bpb": 8.0}, {"step": 10, "bpb": val}],
                "qcontrol": list(decisions), "best_config": {"optim.lr": 0.002}, "exploits": 3}

    decision = {"step": 10, "lr_scale": 1.4, "momentum": 0.9, "action": 2, "explored": True, "reward": 0.1}
    values = {"schedule": [3.00, 3.02, 3.01], "qcontrol": [2.90, 2.91, 2.92], "pbt": [3.01, 2.99, 3.03]}
    arms = {}
    for name, held in values.items():
        runs = [run(h, h - 0.1, [decision] if name == "qcontrol" else []) for h in held]
        arms[name] = {"runs": runs, "heldout_bpb": stats.summarize(held),
                      "val_bpb": stats.summarize([h - 0.1 for h in held])}
    for name in ("qcontrol", "pbt"):
        arms[name]["welch_heldout"] = stats.welch(values[name], values["schedule"])
    results = {"command": "python -m pretrain bench control ...", "commit": "abc", "date": "today",
               "hardware": {"processor": "cpu", "cpus": 2, "gpu": None, "torch": "2"}, "tune_config": "t.yaml",
               "model": "mistral", "seeds": 3, "steps": 300, "tokens_per_model": 307200, "pbt_population": 4,
               "pbt_interval": 2, "selection_batches": 8, "heldout_batches": 32, "lr": 3e-3, "min_lr": 3e-4,
               "warmup_steps": 30, "qcontrol": {"lr_scale_min": 0.1, "lr_scale_max": 4.0, "momentum_min": 0.8,
                                                "momentum_max": 0.99, "every": 10, "epsilon": 0.3, "epsilon_decay": 0.97},
               "search_space": [{"key": "optim.lr", "distribution": "loguniform", "low": 3e-4, "high": 1e-2}],
               "arms": arms, "total_minutes": 1.0}
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| Q-learning controller | 2.9100 ± 0.0100 |" in report
    q_p = arms["qcontrol"]["welch_heldout"]["p"]
    assert "Q-learning controller: held-out bpb 0.1000 lower (better) than the schedule" in report
    assert f"Welch p = {q_p:.3f}, significant at 0.05" in report
    assert "PBT (best of population): held-out bpb 0.0000 different (equal means)" in report
    assert "| 1,228,800 |" in report                 # PBT: 4 x 307,200 tokens
    assert (tmp_path / "curves.png").is_file()


def test_a_runs_hash_ignores_other_families_settings():
    """Every family section of the model config is mapped to its family; a change there moves
    only that family's runs (so adding a family's keys keeps earlier runs reusable)."""
    from model import families, names
    from model.config import ModelConfig
    from pretrain.core.config import load_config
    from pretrain.research.compare import config_hash

    sections = set(ModelConfig().sections)
    assert sections == {f.section for f in families() if f.section} and {f.name for f in families()} == set(names())
    mistral, him = (ROOT / "configs" / name for name in ("mistral_tiny.yaml", "him_tiny.yaml"))
    assert config_hash(load_config(mistral)) == config_hash(load_config(mistral, ["model.him.chunk_size=32"]))
    assert config_hash(load_config(him)) != config_hash(load_config(him, ["model.him.chunk_size=32"]))
    assert config_hash(load_config(mistral)) != config_hash(load_config(mistral, ["optim.lr=1e-3"]))


def test_benchmarks_warn_when_the_machine_is_busy(monkeypatch):
    import os

    from pretrain.bench import provenance

    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * (os.cpu_count() or 1), 0.0, 0.0))
    assert "load average" in provenance.busy_warning()
    assert provenance.hardware()["load_average_1min"] == 2.0 * (os.cpu_count() or 1)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert provenance.busy_warning() is None


def test_run_hash_and_report_name_the_dataset(tmp_path, text_corpus):
    """A dataset re-prepared differently at the same path is other data: finished runs on the old
    one must not be reused, and reports say which data they used."""
    from data_pipeline.prepare import prepare
    from pretrain.bench import provenance
    from pretrain.core.config import load_config
    from pretrain.research.compare import config_hash

    data = tmp_path / "data"
    prepare(str(text_corpus), data, val_fraction=0.25, shard_mb=0.004, log=lambda *_: None)
    cfg = load_config(None, [f"data.path={data}"])
    first, described = config_hash(cfg), provenance.dataset(data)
    assert described["manifest_sha256"] == provenance.dataset_digest(data)
    assert sum(described["documents"].values()) > 0
    prepare(str(text_corpus), data, val_fraction=0.5, shard_mb=0.004, overwrite=True, log=lambda *_: None)
    assert config_hash(cfg) != first
    assert provenance.dataset(data)["manifest_sha256"] != described["manifest_sha256"]
    assert "manifest" in provenance.describe_dataset(described)


def test_the_scaling_verdict_needs_the_whole_confidence_interval_under_the_threshold():
    results = fabricated(fim_exp=1.2)
    fim = results["attention"]["methods"]["fim"]
    for ci, expected in (([1.12, 1.28], stats.SUPPORTED), ([1.05, 1.35], stats.NOT_SUPPORTED),
                         ([1.32, 1.40], stats.NOT_SUPPORTED)):
        fim["exponent_ci"] = ci
        results["attention"]["sweeps"] = 3
        claim = next(c for c in stats.claim_verdicts(results) if c["claim"] == "O(N log N) attention")
        assert claim["verdict"] == expected, ci
        assert f"95% CI {ci[0]:.2f} to {ci[1]:.2f}" in claim["evidence"]
        assert ("straddles" in claim["reason"]) == (ci == [1.05, 1.35])


def test_the_exponent_fit_pools_every_sweep_into_a_confidence_interval():
    from pretrain.bench.attention import _merge, fit_exponent_ci

    sizes = (4096, 8192, 16384, 32768)
    exact = [{"n": n, "fwd_bwd_ms": 1e-3 * n ** 1.2, "peak_mb": 1.0} for n in sizes]
    fit = fit_exponent_ci(exact, 4096, 32768)
    assert fit["exponent"] == pytest.approx(1.2) and fit["ci"] == pytest.approx([1.2, 1.2])
    # three sweeps with +-10% noise: the median is the point, the interval covers the true slope
    noisy = [_merge([{"n": n, "fwd_bwd_ms": 1e-3 * n ** 1.2 * f, "peak_mb": f} for f in (0.9, 1.0, 1.1 + i / 100)])
             for i, n in enumerate(sizes)]
    assert noisy[0]["fwd_bwd_ms"] == pytest.approx(1e-3 * 4096 ** 1.2) and noisy[0]["peak_mb"] == 1.1
    fit = fit_exponent_ci(noisy, 4096, 32768)
    assert fit["samples"] == 12 and fit["ci"][0] < 1.2 < fit["ci"][1] and fit["ci"][1] - fit["ci"][0] < 0.2
    assert fit_exponent_ci(exact, 4096, 4096) is None          # one size: no slope
    assert _merge([{"n": 8, "skipped": "too big"}]) == {"n": 8, "skipped": "too big"}


def test_the_long_context_report_sets_lengths_side_by_side_and_judges_the_8k_target():
    from pretrain.research import long_context

    spec = long_context.load_spec(ROOT / "configs" / "long_context" / "spec.yaml")
    assert [c.length for c in spec.contexts] == [256, 2048, 8192] and spec.seeds >= 3
    assert spec.shared_overrides(spec.contexts[2])[-2:] == ["model.seq_length=8192", "train.micro_batch_size=1"]
    contexts = {}
    for length, fim_spt in ((256, 1.2e-4), (2048, 0.8e-4), (8192, 0.45e-4)):
        sub = json.loads(json.dumps(fabricated(fim_spt=fim_spt)))
        contexts[str(length)] = long_context.summarize_context(sub, f"ctx{length}")
    results = {"benchmark": "long_context", "command": "python -m pretrain bench long-context ...",
               "seeds": 2, "tokens": 1000, "tokens_per_step": 8192, "contexts": contexts,
               "attention": {}, "total_minutes": 30.5,
               **{k: fabricated()[k] for k in ("commit", "date", "hardware")}}
    report = long_context.render(results)
    assert contexts["8192"]["speedup"] == pytest.approx(1e-4 / 0.45e-4)
    assert "| 8,192 | mistral | fim_mistral | 10,000 ± 0 | 22,222 ± 0 | 2.22x" in report
    assert "at 8,192 tokens: **met** (2.22x)" in report
    assert report.count("| O(N log N) attention |") == 3 and "[2,048](ctx2048/report.md)" in report
    contexts["8192"]["speedup"] = 1.5
    assert "**not met** (1.50x)" in long_context.render(results)


def test_a_long_context_spec_names_what_is_wrong(tmp_path):
    from pretrain.core.config import ConfigError
    from pretrain.research import long_context

    good = (ROOT / "configs" / "long_context" / "spec.yaml").read_text()
    for bad, message in ((good.replace("length: 2048", "length: 3000"), "length 3000 must divide"),
                         (good.replace("seeds: 3", "seed: 3"), "seed"),
                         (good.replace("[model.sliding_window=1024]", "[model.sliding_windw=1024]"),
                          "sliding_windw")):
        path = tmp_path / "spec.yaml"
        path.write_text(bad.replace("configs/long_context/", str(ROOT / "configs" / "long_context") + "/"))
        with pytest.raises(ConfigError, match=message):
            long_context.load_spec(path)


@pytest.mark.integration
def test_bench_long_context_trains_every_length_and_times_attention_once(dataset, tmp_path):
    spec = {"baseline": str(ROOT / "configs" / "long_context" / "mistral.yaml"),
            "variant": str(ROOT / "configs" / "long_context" / "fim_mistral.yaml"),
            "seeds": 1, "tokens": 512, "tokens_per_step": 256,
            "overrides": [f"data.path={dataset}", "model.num_layers=1", "model.hidden_size=32",
                          "model.num_attention_heads=2", "model.num_query_groups=1",
                          "model.ffn_hidden_size=64", "train.eval_batches=1", "optim.warmup_steps=1"],
            "contexts": [{"length": 128, "baseline": ["model.sliding_window=64"],
                          "variant": ["model.fim.block_size=16", "model.fim.branching=2"]},
                         {"length": 256, "baseline": ["model.sliding_window=128"],
                          "variant": ["model.fim.block_size=32", "model.fim.branching=2"]}],
            "attention": {"max_n": 512, "fit": [256, 512], "sweeps": 2}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "report"
    result = run_cli("-m", "pretrain", "bench", "long-context", "--spec", str(tmp_path / "spec.yaml"),
                     "--out", str(out), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("--- attention scaling: reused") == 1   # timed at the first length only
    results = json.loads((out / "results.json").read_text())
    assert list(results["contexts"]) == ["128", "256"] and results["attention"]["sweeps"] == 2
    for length, entry in results["contexts"].items():
        sub = json.loads((out / f"ctx{length}" / "results.json").read_text())
        assert {a["runs"][0]["tokens"] for a in sub["arms"].values()} == {512}   # equal tokens per arm
        saved = yaml.safe_load(Path(sub["arms"][sub["baseline"]]["runs"][0]["run_dir"], "config.yaml").read_text())
        assert saved["model"]["seq_length"] == int(length) and saved["train"]["micro_batch_size"] == 256 // int(length)
        assert entry["speedup"] > 0 and len(entry["claims"]) == 5
        assert "](../attention/attention_scaling.png)" in (out / f"ctx{length}" / "report.md").read_text()
    assert "| 256 | O(N log N) attention |" in (out / "report.md").read_text()


def test_the_interpretability_verdict_reads_the_needle_attention_proxy():
    def with_needle(base, fim):
        results = fabricated()
        for name, values in (("mistral", base), ("fim_mistral", fim)):
            results["arms"][name]["needle_mass"] = {"mean_over_contexts": stats.summarize(values),
                                                    "by_context": {"128": stats.summarize(values)}}
        results["claims"] = stats.claim_verdicts(results)
        return results

    results = with_needle([0.20, 0.22], [0.30, 0.31])                    # 1.45x, p < 0.05
    assert verdicts(results)["interpretability"] == stats.SUPPORTED
    assert "| fim_mistral | needle attention | 0.305 ± 0.007 | n/a (> seq length) |" in render(results)
    assert verdicts(with_needle([0.20, 0.22], [0.24, 0.25]))["interpretability"] == stats.NOT_SUPPORTED  # 1.17x
    assert verdicts(with_needle([0.10, 0.30], [0.30, 0.31]))["interpretability"] == stats.NOT_SUPPORTED  # noise
