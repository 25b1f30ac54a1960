"""reports/recall/report.md and recall.png, rendered from results.json alone (`bench recall`)."""
from __future__ import annotations

import math
from pathlib import Path

from pretrain.bench.provenance import describe
from pretrain.tools.plots import figure


def _pm(summary: dict, fmt: str) -> str:
    return f"{summary['mean']:{fmt}} ± {summary['std']:{fmt}}"


def _row(results: dict, mixer: str, length: int, width: int) -> dict:
    return next(r for r in results["summary"]
                if (r["mixer"], r["length"], r["width"]) == (mixer, length, width))


def plot(results: dict, path: Path) -> None:
    """Accuracy (top) and bits per answer token (bottom) against length, one line per mixer with
    error bars over seeds, one column per width."""
    o = results["options"]
    widths, lengths = o["widths"], o["lengths"]
    with figure(path, 2, len(widths), figsize=(4.2 * len(widths) + 0.6, 7), squeeze=False) as (fig, axes):
        for col, width in enumerate(widths):
            for i, mixer in enumerate(o["mixers"]):
                rows = [_row(results, mixer, n, width) for n in lengths]
                for ax, key in zip(axes[:, col], ("accuracy", "answer_bits")):
                    ax.errorbar(lengths, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows],
                                marker="o", capsize=3, color=f"C{i}", label=mixer)
            top, bottom = axes[0, col], axes[1, col]
            top.set_title(f"width {width}")
            top.set_ylabel("accuracy on the values")
            top.set_ylim(-0.05, 1.05)
            bottom.set_ylabel("bits per answer token")
            values = o["vocab"] - o["vocab"] // 2
            bottom.axhline(math.log2(values), color="k", ls="--", lw=1, label=f"chance: log2({values})")
            bottom.plot(lengths, [math.log2(results["pairs"][str(n)]) for n in lengths], "k:",
                        label="log2(pairs): values known, not bound")
            for ax in (top, bottom):
                ax.set_xscale("log", base=2)
                ax.set_xticks(lengths, [str(n) for n in lengths])
                ax.set_xlabel("sequence length")
                ax.grid(True, alpha=0.3)
            top.legend(fontsize=8)
            bottom.legend(fontsize=8)


def render(results: dict) -> str:
    o = results["options"]
    lengths, widths, mixers = o["lengths"], o["widths"], o["mixers"]
    values = o["vocab"] - o["vocab"] // 2
    lrs = ", ".join(f"{lr:g}" for lr in o["lrs"])
    head = " | ".join(f"L={n}" for n in lengths)
    lines = ["# MQAR recall: dense vs sliding-window vs FIM attention, trained on the task", "",
             "## Setup", "",
             f"- Command: `{results['command']}`",
             f"- Commit `{results['commit']}`, {results['date']}; hardware: {describe(results['hardware'])}, "
             f"{o['threads']} torch thread(s)",
             f"- Total time: {results['total_minutes']:.1f} min for {len(results['points'])} trained models",
             f"- Task: multi-query associative recall in Zoology's form (Arora et al., 2023): vocabulary "
             f"{o['vocab']}, keys from its lower half, values from its upper half ({values} values); "
             "the key-value pairs first, then every key queried once at a power-law gap (a = 0.01: near "
             "queries likelier), other positions 0; loss, accuracy and bits on the value positions only. "
             "Pairs per length: " + ", ".join(f"{n}: {p}" for n, p in results["pairs"].items()) + ".",
             f"- Held-out: {o['eval_examples']} sequences per length (data seed 0), the same for every "
             "mixer and seed; training batches are drawn fresh each step, and seed s gives every mixer "
             "the same batches.",
             f"- Model: our Mistral family through the registry, 2 layers (RMSNorm, RoPE, SwiGLU of "
             f"{o['ffn_mult']} x width), width / {o['head_dim']} heads, built whole in one process; "
             "the mixer is its core attention (FIM: FIM-Mistral, with its fractal position embedding).",
             f"- Training: a plain AdamW loop over the model (no DeepSpeed): betas 0.9/0.98, weight "
             f"decay 0.1, gradient clip 1.0, {o['steps']} steps x {o['batch']} sequences, linear "
             f"warm-up over {o['warmup']:.0%} of them, then cosine to 10% of the peak; learning rates {lrs}: the one with the best mean "
             "held-out accuracy over seeds is reported per point (Zoology's protocol; chosen on the "
             "held-out set itself).",
             f"- Reference levels: chance is {1 / values:.4f} accuracy and {math.log2(values):.2f} bits "
             f"(uniform over the {values} values); a model that knows which values the context holds "
             "but not which key each belongs to scores 1 / pairs accuracy and log2(pairs) bits.", "",
             "Keys one query may attend (upper bound, before the causal cut):", "",
             f"| mixer | attention | {head} |", "|---|---|" + "---|" * len(lengths)]
    for mixer in mixers:
        kind, _, branches = mixer.partition(":")
        what = {"dense": "full causal", "window": f"sliding window {o['window']}",
                "fim": f"FIM, block {o['fim_block']}, branching 2, top-2, branches "
                       f"{branches or 'local,hierarchical,routed'}"}[kind]
        keys = results["attended_keys"][mixer]
        lines.append(f"| {mixer} | {what} | " + " | ".join(str(keys[str(n)]) for n in lengths) + " |")
    if any(m.startswith("fim") for m in mixers):
        lines += ["", "FIM's keys: its own leaf block exactly, the top-2 routed earlier blocks exactly (chosen "
                  "among the blocks before the preceding one: the block just before a query's own is "
                  "seen only inside pooled summaries), and one pooled summary per earlier sibling "
                  "unit of each level (kernels/fim_geometry.py)."]
    for title, key, fmt in (("Accuracy on the values", "accuracy", ".3f"),
                            ("Bits per answer token (mean -log2 p of the value)", "answer_bits", ".2f")):
        lines += ["", f"## {title}", "",
                  f"Mean ± sample standard deviation over {o['seeds']} seeds, at the best learning rate.", "",
                  f"| mixer | width | {head} |", "|---|---|" + "---|" * len(lengths)]
        for mixer in mixers:
            for width in widths:
                cells = [_pm(_row(results, mixer, n, width)[key], fmt) for n in lengths]
                lines.append(f"| {mixer} | {width} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy and bits against sequence length](recall.png)", "",
              "## Every run", "", "| mixer | length | width | lr | seed | accuracy | bits | train loss | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        lines.append(f"| {p['mixer']} | {p['length']} | {p['width']} | {p['lr']:g} | {p['seed']} | "
                     f"{p['accuracy']:.3f} | {p['answer_bits']:.2f} | {p['final_train_loss']:.3f} | "
                     f"{p['seconds']:.1f} |")
    lines += ["", "## Reproduce", "", "```bash", results["command"], "```", "",
              "`results.json` beside this file holds every number above.", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> Path:
    plot(results, out_dir / "recall.png")
    path = out_dir / "report.md"
    path.write_text(render(results))
    return path
