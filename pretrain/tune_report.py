"""The end-of-search summary of `pretrain tune`: best config, a table of trials, curves, and the
exploit/explore history (our own record of every start from another trial's checkpoint)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _history(result) -> list[dict]:
    df = result.metrics_dataframe
    if df is None or "bpb" not in df:
        return []
    return [{"iteration": int(r.training_iteration), "step": int(r.step), "bpb": float(r.bpb),
             "loss": float(r.loss)} for r in df.itertuples()]


def write_summary(spec, config_path: str, grid, out_dir: Path, layout: dict | None = None) -> dict:
    from .tune import save_best

    trials, exploits = [], []
    for result in grid:
        path = Path(result.path)
        trial_id = (result.metrics or {}).get("trial_id", path.name)
        history = _history(result)
        trials.append({"trial": trial_id, "dir": str(out_dir / "trials" / str(trial_id)),
                       "config": result.config,
                       "error": None if result.error is None else str(result.error).splitlines()[0],
                       "final_bpb": history[-1]["bpb"] if history else None,
                       "best_bpb": min((h["bpb"] for h in history), default=None),
                       "final_step": history[-1]["step"] if history else None, "history": history})
        log = out_dir / "trials" / str(trial_id) / "exploits.jsonl"
        if log.is_file():
            exploits += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    finished = [t for t in trials if t["final_bpb"] is not None]
    best = min(finished, key=lambda t: t["final_bpb"]) if finished else None
    summary = {"config": config_path, "scheduler": spec.scheduler.name, "metric": spec.metric,
               "num_samples": spec.num_samples, "trials": trials,
               "exploits": sorted(exploits, key=lambda e: (e["at_step"], e["trial"])),
               "best": None if best is None else {"trial": best["trial"], "bpb": best["final_bpb"],
                                                  "config": best["config"]},
               "layout_search": _layout_summary(layout)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if best is not None:
        save_best(spec, best["config"], out_dir / "best_config.yaml")
    _plot(trials, out_dir / "curves.png")
    (out_dir / "summary.md").write_text(_render(summary))
    return summary


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _render(summary: dict) -> str:
    keys = sorted({k for t in summary["trials"] for k in t["config"]})
    lines = [f"# tune: {summary['config']} ({summary['scheduler']}, {summary['num_samples']} trials, "
             f"final validation {summary['metric']})", ""]
    if summary["best"]:
        b = summary["best"]
        lines += [f"Best: trial `{b['trial']}`, val bpb {b['bpb']:.4f}, "
                  + ", ".join(f"`{k}`={_fmt(v)}" for k, v in sorted(b["config"].items()))
                  + " (full config: `best_config.yaml`).", ""]
    lines += ["| trial | " + " | ".join(f"`{k}` (final)" for k in keys) + " | final step | final bpb | best bpb | error |",
              "|---|" + "---|" * (len(keys) + 4)]
    for t in sorted(summary["trials"], key=lambda t: math.inf if t["final_bpb"] is None else t["final_bpb"]):
        cells = [_fmt(t["config"].get(k, "")) for k in keys]
        bpb = "n/a" if t["final_bpb"] is None else f"{t['final_bpb']:.4f}"
        best = "n/a" if t["best_bpb"] is None else f"{t['best_bpb']:.4f}"
        lines.append(f"| {t['trial']} | " + " | ".join(cells) + f" | {t['final_step']} | {bpb} | {best} | {t['error'] or ''} |")
    lines += ["", "![validation bpb per trial](curves.png)", ""]
    if summary["layout_search"]:
        lines += _render_layouts(summary["layout_search"])
    if summary["scheduler"] in ("pbt", "pb2"):
        lines += [f"## Exploit / explore history ({len(summary['exploits'])} events)", "",
                  "A trial that restarted from another trial's checkpoint with perturbed values.", "",
                  "| at step | trial | cloned from | new values |", "|---|---|---|---|"]
        for e in summary["exploits"]:
            values = ", ".join(f"`{k}`={_fmt(v)}" for k, v in sorted(e["config"].items()))
            lines.append(f"| {e['at_step']} | {e['trial']} | {e['cloned_from']} | {values} |")
        lines.append("")
    return "\n".join(lines)


def _layout_text(layout: list[dict]) -> str:
    return " / ".join(f"B{l['block_size']} b{l['branching']} k{l['top_k']} {l['branches']}" for l in layout)


def _layout_summary(layout: dict | None) -> dict | None:
    """The default layout's trial against the best-rewarded trained layout."""
    if not layout or not layout["history"]:
        return None
    history = layout["history"]
    default = next((h for h in history if h["default"]), None)
    chosen = max(history, key=lambda h: h["reward"])
    return {"trials": history, "default": default, "chosen": chosen,
            "policy_choice": layout["policy_choice"]}


def _render_layouts(ls: dict) -> list[str]:
    lines = ["## FIM layout search (REINFORCE over per-layer settings)", "",
             "Reward: -val bpb - flops_weight x log2(training FLOPs per token / the default's). "
             "Layers separated by `/`: leaf block B, branching b, routed top-k, branches.", "",
             "| trial | layout | val bpb | MFLOP/token | reward |", "|---|---|---|---|---|"]
    for h in ls["trials"]:
        tag = " (default)" if h["default"] else ""
        lines.append(f"| {h['trial']}{tag} | {_layout_text(h['layout'])} | {h['bpb']:.4f} | "
                     f"{h['flops_per_token'] / 1e6:.2f} | {h['reward']:.4f} |")
    chosen, default = ls["chosen"], ls["default"]
    lines.append("")
    if default is not None:
        lines.append(f"Chosen (highest reward) layout: {_layout_text(chosen['layout'])}, val bpb "
                     f"{chosen['bpb']:.4f} at {chosen['flops_per_token'] / 1e6:.2f} MFLOP/token, against "
                     f"the default layout's {default['bpb']:.4f} at {default['flops_per_token'] / 1e6:.2f} "
                     f"MFLOP/token (bpb {chosen['bpb'] - default['bpb']:+.4f}).")
    lines += [f"The policy's most likely layout after the search: {_layout_text(ls['policy_choice'])}.", ""]
    return lines


def _plot(trials: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, t in enumerate(trials):
        if t["history"]:
            ax.plot([h["step"] for h in t["history"]], [h["bpb"] for h in t["history"]], "o-",
                    color=f"C{i % 10}", alpha=0.8, label=t["trial"])
    ax.set_xlabel("training step (an exploited trial jumps to its source's step)")
    ax.set_ylabel("validation bits per byte")
    ax.grid(True, alpha=0.3)
    if any(t["history"] for t in trials):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
