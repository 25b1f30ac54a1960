"""reports/<name>/report.md and its plots, rendered from results.json alone: every number in the
report is a value of that file, printed at the precision shown."""
from __future__ import annotations

from pathlib import Path

from pretrain.bench.provenance import describe, describe_dataset
from pretrain.tools.plots import figure


def _pm(summary: dict, fmt: str) -> str:
    return f"{summary['mean']:{fmt}} ± {summary['std']:{fmt}}"


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot_curves(results: dict, path: Path) -> None:
    with figure(path, figsize=(6.5, 4.2)) as (fig, ax):
        for i, (name, arm) in enumerate(results["arms"].items()):
            for j, run in enumerate(arm["runs"]):
                pts = run["curve"][1:]  # skip step 0 (uniform guess) to keep the scale readable
                ax.plot([p["tokens"] for p in pts], [p["bpb"] for p in pts], "o-", color=f"C{i}",
                        alpha=0.8, label=name if j == 0 else None)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("validation bpb against tokens (one line per seed)")
        ax.grid(True, alpha=0.3)
        ax.legend()


def plot_tasks(results: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(10, 3.8)) as (fig, axes):
        for ax, task in zip(axes, ("passkey", "mqar")):
            for i, (name, arm) in enumerate(results["arms"].items()):
                by = arm["tasks"][task]["by_context"]
                contexts = sorted(by, key=int)
                ax.errorbar([int(c) for c in contexts], [by[c]["mean"] for c in contexts],
                            yerr=[by[c]["std"] for c in contexts], marker="o", capsize=3, label=name,
                            color=f"C{i}")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(task)
            ax.grid(True, alpha=0.3)
            ax.legend()


def _attention_section(att: dict, where: str = "attention") -> list[str]:
    shape = att["shape"]
    sweeps = att.get("sweeps", 1)
    lines = ["### Attention scaling", "",
             f"Forward+backward of one attention call on {att['device']}, {shape['dtype']}, "
             f"batch {shape['batch']}, {shape['heads']} heads / {shape['kv_heads']} KV heads, "
             f"head dim {shape['head_dim']}; sliding window {shape['window']}; FIM block "
             f"{shape['block']}, branching {shape['branching']}, top-{shape['top_k']} "
             f"(`python -m pretrain bench attention`). Exponent: least-squares slope of log time "
             f"against log N over N in {att['fit_range']}"
             + (f"; each N timed in {sweeps} fresh processes (the median shown; the 95% confidence "
                "interval from every sweep's times)." if sweeps > 1 else "."), "",
             "| method | exponent | " + " | ".join(
                 f"N={p['n']} ms" for p in att["methods"]["dense"]["points"]) + " |",
             "|---|---|" + "---|" * len(att["methods"]["dense"]["points"])]
    for method, entry in att["methods"].items():
        exponent = "n/a" if entry["exponent"] is None else f"{entry['exponent']:.3f}"
        if entry.get("exponent_ci"):
            exponent += f" [{entry['exponent_ci'][0]:.3f}, {entry['exponent_ci'][1]:.3f}]"
        cells = [f"{p['fwd_bwd_ms']:.1f}" if "fwd_bwd_ms" in p else "skipped" for p in entry["points"]]
        lines.append(f"| {method} | {exponent} | " + " | ".join(cells) + " |")
    return lines + ["", f"![attention scaling]({where}/attention_scaling.png)", ""]


def _context_row(arm: str, label: str, by: dict, contexts: list[int], fmt: str) -> str:
    cells = [_pm(by[str(c)], fmt) if str(c) in by else "n/a (> seq length)" for c in contexts]
    return f"| {arm} | {label} | " + " | ".join(cells) + " |"


def render(results: dict) -> str:
    arms, base = results["arms"], results["baseline"]
    hw = results["hardware"]
    lines = [f"# Baseline vs variants: {', '.join(results['variants']) or '(none)'} against {base}", "",
             "## Setup", "",
             f"- Command: `{results['command']}`",
             f"- Commit `{results['commit']}`, {results['date']}; hardware: {describe(hw)}",
             *[f"- Data: {d}" for d in sorted({describe_dataset(v) for v in results.get("datasets", {}).values()})],
             f"- Budget: {results['tokens']:,} training tokens per run requested (whole steps: trained "
             "tokens below), "
             f"{results['seeds']} seeds per arm; "
             "every arm sees the same batches for a given seed (the data order depends on the seed only)",
             f"- Total time of this report: {results['total_minutes']:.1f} min", "",
             "| arm | config | model | parameters | training FLOPs per token | trained tokens per run |",
             "|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        lines.append(f"| {name} | `{arm['config']}` | {arm['model']} | {arm['params']:,} | "
                     f"{arm['flops_per_token']:.4g} | {arm['runs'][0]['tokens']:,} |")
    lines += ["", "## Results", "",
              "Mean ± sample standard deviation over seeds. p: Welch's t-test of the validation bpb "
              "against the baseline (two-sided; with 2 seeds it has little power).", "",
              "| arm | val bpb | p vs baseline | wall s | training FLOPs | tokens/s | MFU | peak MB |",
              "|---|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        p = _p(arm.get("welch_bpb", {}).get("p")) if name != base else "(baseline)"
        lines.append(f"| {name} | {_pm(arm['bpb'], '.4f')} | {p} | {_pm(arm['elapsed_s'], '.1f')} | "
                     f"{arm['training_flops']:.4g} | {_pm(arm['tokens_per_s'], '.0f')} | "
                     f"{_pm(arm['mfu'], '.3f')} | {_pm(arm['peak_mem_mb'], '.0f')} |")
    lines += ["", "![validation bpb against tokens](bpb_vs_tokens.png)", "",
              "### Retrieval (accuracy of the whole answer, teacher-forced greedy)", "",
              "Bits: the answer's mean -log2 p per answer token (teacher-forced), which falls before "
              "accuracy rises.", "",
              "| arm | task | " + " | ".join(f"ctx {c}" for c in results["contexts"]) + " |",
              "|---|---|" + "---|" * len(results["contexts"])]
    for name, arm in arms.items():
        for task in ("passkey", "mqar"):
            for label, key, fmt in ((task, "by_context", ".2f"), (f"{task} bits", "bits_by_context", ".2f")):
                by = arm["tasks"][task].get(key)
                if by is None:   # results written before answer bits were recorded
                    continue
                lines.append(_context_row(name, label, by, results["contexts"], fmt))
        if "needle_mass" in arm:
            lines.append(_context_row(name, "needle attention", arm["needle_mass"]["by_context"],
                                      results["contexts"], ".3f"))
    lines += ["", "Needle attention (the interpretability proxy): the attention weight that the queries "
              "predicting the pass key put on the sentence stating it, best layer and head, mean over "
              "prompts (definition: `pretrain/research/interpretability.py`).", "",
              "![retrieval accuracy against context length](tasks.png)", ""]
    levels = {name: arm for name, arm in arms.items() if arm["runs"][0].get("level_losses")}
    if levels:
        keys = sorted(next(iter(levels.values()))["runs"][0]["level_losses"])
        lines += ["### Nested models: training loss per level (nats/token, last log window)", "",
                  "Level 0 is the full model; level l holds branching^l models of 1/branching^l "
                  "its width, each predicting every token (their mean loss).", "",
                  "| arm | seed | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for name, arm in levels.items():
            for run in arm["runs"]:
                cells = [f"{run['level_losses'].get(k, float('nan')):.4f}" for k in keys]
                lines.append(f"| {name} | {run['seed']} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["attention"] is not None:
        lines += _attention_section(results["attention"], results.get("attention_path", "attention"))
    if results["claims"]:
        lines += ["## Claims of the FIM design document", "",
                  f"Evidence from arm `{results['claims_arm']}` against `{base}`.", "",
                  "| claim | measured evidence | verdict | why |", "|---|---|---|---|"]
        for c in results["claims"]:
            lines.append(f"| {c['claim']} | {c['evidence']} | **{c['verdict']}** | {c['reason']} |")
        lines.append("")
    if results.get("inspect_attention_png"):
        lines += ["### Where FIM attention goes (seed 0, one text)", "",
                  f"![FIM attention]({results['inspect_attention_png']})", ""]
    lines += ["## Reproduce", "", "```bash", results["command"], "```", "",
              "Finished runs are reused (their directory name holds a hash of the resolved config); "
              "`results.json` beside this file holds every number above.", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> Path:
    plot_curves(results, out_dir / "bpb_vs_tokens.png")
    plot_tasks(results, out_dir / "tasks.png")
    path = out_dir / "report.md"
    path.write_text(render(results))
    return path
