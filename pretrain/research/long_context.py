"""`bench long-context`: the baseline against FIM-Mistral trained at several context lengths, one
report. Each length is a `bench compare` of its own (OUT/ctxL/: both arms at that context, the
same tokens per step and per run, the same batches per seed); the attention scaling with its
confidence interval is timed once (OUT/attention/) and shared. OUT/report.md puts the lengths
side by side: validation bpb, training tokens/s (FIM over baseline), and each FIM claim per
length with its evidence.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.core.config import ConfigError, build_typed, load_config
from pretrain.research import stats

ROOT = Path(__file__).resolve().parents[2]
SPEEDUP_TARGET_CONTEXT = 8192      # issue 28: FIM's training tokens/s >= 2x the baseline's at 8k
SPEEDUP_TARGET = 2.0


@dataclass
class ContextSpec:
    length: int
    baseline: list[str] = field(default_factory=list)   # --set overrides of the baseline arm here
    variant: list[str] = field(default_factory=list)    # and of the variant arm


@dataclass
class AttentionSpec:
    max_n: int = 32768
    fit: list[int] = field(default_factory=lambda: [4096, 32768])
    sweeps: int = 3


@dataclass
class LongContextSpec:
    baseline: str
    variant: str
    contexts: list[ContextSpec]
    seeds: int = 3
    tokens: int = 1_000_000
    tokens_per_step: int = 8192
    overrides: list[str] = field(default_factory=list)   # --set overrides of both arms at every length
    attention: AttentionSpec = field(default_factory=AttentionSpec)

    def validate(self) -> "LongContextSpec":
        if not self.contexts:
            raise ConfigError("contexts: list at least one context length")
        if self.seeds < 1 or self.tokens < self.tokens_per_step:
            raise ConfigError("seeds must be >= 1 and tokens >= tokens_per_step")
        for c in self.contexts:
            if c.length <= 0 or self.tokens_per_step % c.length:
                raise ConfigError(f"contexts: length {c.length} must divide tokens_per_step "
                                  f"({self.tokens_per_step}): every length trains the same tokens per step")
            for path, sets in ((self.baseline, c.baseline), (self.variant, c.variant)):
                for s in sets:
                    if "," in s:
                        raise ConfigError(f"contexts[{c.length}]: {s!r}: one KEY=VALUE per list item, "
                                          "no commas")
                load_config(ROOT / path, [*self.shared_overrides(c), *sets])   # every key must exist
        if len(self.attention.fit) != 2 or not 0 < self.attention.fit[0] < self.attention.fit[1]:
            raise ConfigError(f"attention.fit={self.attention.fit}: need [LO, HI] with LO < HI")
        if self.attention.sweeps < 1:
            raise ConfigError("attention.sweeps must be >= 1")
        return self

    def shared_overrides(self, c: ContextSpec) -> list[str]:
        return [*self.overrides, f"model.seq_length={c.length}",
                f"train.micro_batch_size={self.tokens_per_step // c.length}"]


def load_spec(path: str | Path) -> LongContextSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"long-context spec not found: {path}")
    return build_typed(LongContextSpec, yaml.safe_load(path.read_text()) or {}, "").validate()


def run(spec: LongContextSpec, out: str, runs_dir: str, command: str, seeds: int | None = None) -> dict:
    from pretrain.research import compare

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    seeds = seeds or spec.seeds
    per_context = {}

    def arm(path: str, sets: list[str]) -> str:   # compare's PATH:KEY=VALUE,... arm
        return f"{path}:{','.join(sets)}" if sets else path

    for c in spec.contexts:
        print(f"=== context {c.length}: {spec.tokens:,} tokens per run, {seeds} seeds per arm", flush=True)
        options = compare.CompareOptions(
            arm(spec.baseline, c.baseline), [arm(spec.variant, c.variant)], seeds, spec.tokens,
            str(out_dir / f"ctx{c.length}"), spec.shared_overrides(c), runs_dir, contexts=[c.length],
            attention_max_n=spec.attention.max_n, attention_fit=tuple(spec.attention.fit),
            attention_dir=str(out_dir / "attention"), attention_sweeps=spec.attention.sweeps)
        per_context[str(c.length)] = summarize_context(compare.run(options, command), f"ctx{c.length}")
    results = {"benchmark": "long_context", "command": command, "seeds": seeds, "tokens": spec.tokens,
               "tokens_per_step": spec.tokens_per_step, "contexts": per_context,
               "attention": json.loads((out_dir / "attention" / "results.json").read_text()),
               "total_minutes": (time.time() - start) / 60}
    first = next(iter(per_context.values()))
    results.update({k: first[k] for k in ("commit", "date", "hardware")})
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "report.md").write_text(render(results))
    return results


def summarize_context(results: dict, subdir: str) -> dict:
    """What the side-by-side report needs from one length's `bench compare` results."""
    base, var = results["arms"][results["baseline"]], results["arms"][results["claims_arm"]]
    speed = stats.welch(var["tokens_per_s"]["values"], base["tokens_per_s"]["values"])
    return {"report": f"{subdir}/report.md", "commit": results["commit"], "date": results["date"],
            "hardware": results["hardware"],
            "arms": {role: {"name": arm["name"], "config": arm["config"], "params": arm["params"],
                            "flops_per_token": arm["flops_per_token"], "bpb": arm["bpb"],
                            "tokens_per_s": arm["tokens_per_s"], "tokens": arm["runs"][0]["tokens"]}
                     for role, arm in (("baseline", base), ("variant", var))},
            "welch_bpb": var.get("welch_bpb", {}),
            "speedup": var["tokens_per_s"]["mean"] / base["tokens_per_s"]["mean"], "welch_tokens_per_s": speed,
            "claims": results["claims"]}


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def render(results: dict) -> str:
    from pretrain.research.compare_report import _pm, describe

    contexts = results["contexts"]
    lines = ["# Long context: FIM-Mistral against the baseline at " + ", ".join(f"{int(c):,}" for c in contexts)
             + " tokens", "", "## Setup", "",
             f"- Command: `{results['command']}`",
             f"- Commit `{results['commit']}`, {results['date']}; hardware: {describe(results['hardware'])}",
             f"- Budget: {results['tokens']:,} training tokens per run requested, {results['tokens_per_step']:,} "
             f"per step at every length; {results['seeds']} seeds per arm; the same batches per seed in both arms",
             f"- Total time: {results['total_minutes']:.1f} min; each length's full report: "
             + ", ".join(f"[{int(c):,}]({e['report']})" for c, e in contexts.items()), "",
             "## Training throughput and quality", "",
             "Mean ± sample standard deviation over seeds; p: Welch's t-test against the baseline.", "",
             "| context | baseline | FIM-Mistral | baseline tokens/s | FIM tokens/s | FIM / baseline (p) "
             "| baseline val bpb | FIM val bpb (p) |", "|---|---|---|---|---|---|---|---|"]
    for c, e in contexts.items():
        b, v = e["arms"]["baseline"], e["arms"]["variant"]
        lines.append(f"| {int(c):,} | {b['name']} | {v['name']} | {_pm(b['tokens_per_s'], ',.0f')} | "
                     f"{_pm(v['tokens_per_s'], ',.0f')} | {e['speedup']:.2f}x ({_p(e['welch_tokens_per_s']['p'])}) | "
                     f"{_pm(b['bpb'], '.4f')} | {_pm(v['bpb'], '.4f')} ({_p(e['welch_bpb'].get('p'))}) |")
    target = contexts.get(str(SPEEDUP_TARGET_CONTEXT))
    if target is not None:
        met = "met" if target["speedup"] >= SPEEDUP_TARGET else "not met"
        lines += ["", f"Target for our FIM path: at least {SPEEDUP_TARGET:.0f}x the baseline's training "
                  f"tokens/s at {SPEEDUP_TARGET_CONTEXT:,} tokens: **{met}** ({target['speedup']:.2f}x)."]
    lines += ["", "## Claims of the FIM design document, per context length", "",
              "| context | claim | measured evidence | verdict | why |", "|---|---|---|---|---|"]
    for c, e in contexts.items():
        for claim in e["claims"]:
            lines.append(f"| {int(c):,} | {claim['claim']} | {claim['evidence']} | **{claim['verdict']}** | "
                         f"{claim['reason']} |")
    lines += ["", "The attention scaling (the O(N log N) row) is one measurement of the attention ops alone, "
              "shared by every length: [attention/results.json](attention/results.json), "
              "![attention scaling](attention/attention_scaling.png)", "",
              "## Reproduce", "", "```bash", results["command"], "```", "",
              "Finished runs are reused; `results.json` beside this file holds every number above.", ""]
    return "\n".join(lines)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("long-context", help="baseline vs FIM at several context lengths -> one report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  python -m pretrain bench long-context --spec "
                              "configs/long_context/spec.yaml --out reports/long_context")
    p.add_argument("--spec", required=True, metavar="FILE", help="long-context spec YAML "
                   "(configs/long_context/spec.yaml)")
    p.add_argument("--out", default="reports/long_context", help="report directory (default reports/long_context)")
    p.add_argument("--runs-dir", default="runs/long_context", help="where runs live (default runs/long_context)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the spec's)")
    return p


def main(args) -> int:
    spec = load_spec(args.spec)
    results = run(spec, args.out, args.runs_dir, args.command, args.seeds)
    print(f"report: {Path(args.out) / 'report.md'} ({results['total_minutes']:.1f} min)")
    return 0
