"""The end-of-search summary of `pretrain tune`: best config, a table of trials, curves, and the
exploit/explore history (our own record of every start from another trial's checkpoint)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pretrain.research.tune_spec import EXPERIMENT, save_best
from pretrain.tools.plots import figure


def _history(result) -> list[dict]:
    df = result.metrics_dataframe
    if df is None or "bpb" not in df:
        return []
    return [{"iteration": int(r.training_iteration), "step": int(r.step), "bpb": float(r.bpb),
             "loss": float(r.loss)} for r in df.itertuples()]


def _trial_id(result) -> str:
    """From the trial directory's name: after a PBT exploit Ray copies the cloned trial's last
    result, trial_id included, into the exploiting trial."""
    name = Path(result.path).name
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", name) or re.match(r"run_trial_([0-9a-f]{8})_", name)
    return match.group(1) if match else name


def trial_subdir(trial_id: str) -> str:
    """A trial's directory under OUT (its run directory and exploits log), for the trainable and
    the summary alike."""
    return f"trials/{trial_id}"


def _ray_exploits(experiment: Path) -> list[dict]:
    """Ray's own PBT log: [target tag, clone tag, target iteration, clone iteration, old, new]."""
    log = experiment / "pbt_global.txt"
    if not log.is_file():
        return []
    events = []
    for line in log.read_text().splitlines():
        target, clone, target_iter, clone_iter, _, new = json.loads(line)
        events.append({"trial": target, "cloned_from": clone, "trial_iteration": target_iter,
                       "clone_iteration": clone_iter, "config": new})
    return events


def write_summary(spec, config_path: str, grid, out_dir: Path, layout: dict | None = None) -> dict:
    trials, restarts = [], []
    for result in grid:
        trial_id = _trial_id(result)
        last = result.metrics or {}
        history = _history(result)
        subdir = trial_subdir(trial_id)   # relative to OUT: the summary moves with it
        trials.append({"trial": trial_id, "dir": subdir, "config": result.config,
                       "error": None if result.error is None else str(result.error).splitlines()[0],
                       # Ray's last result: after exploiting a finished trial, that trial's final one
                       "final_bpb": last.get("bpb"), "final_step": last.get("step"),
                       "best_bpb": min((h["bpb"] for h in history), default=None), "history": history})
        log = out_dir / subdir / "exploits.jsonl"
        if log.is_file():
            restarts += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    finished = [t for t in trials if t["final_bpb"] is not None]
    best = min(finished, key=lambda t: t["final_bpb"]) if finished else None
    summary = {"config": config_path, "scheduler": spec.scheduler.name, "metric": spec.metric,
               "num_samples": spec.num_samples, "tokens": spec.tokens, "trials": trials,
               "exploits": _ray_exploits(out_dir / EXPERIMENT),
               "restarts_from_other_trials": sorted(restarts, key=lambda e: (e["at_step"], e["trial"])),
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
    if summary.get("tokens"):
        lines += [f"Budget: {summary['tokens']:,} training tokens per trial (steps from each trial's "
                  "batch and context).", ""]
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
        lines += [f"## Exploit / explore history ({len(summary['exploits'])} events, Ray's PBT log)", "",
                  "The target trial continues from the cloned trial's checkpoint with perturbed values.", "",
                  "| trial | at its report | cloned from | at its report | new values |", "|---|---|---|---|---|"]
        for e in summary["exploits"]:
            values = ", ".join(f"`{k}`={_fmt(v)}" for k, v in sorted(e["config"].items()))
            lines.append(f"| {e['trial']} | {e['trial_iteration']} | {e['cloned_from']} | "
                         f"{e['clone_iteration']} | {values} |")
        lines += ["", f"{len(summary['restarts_from_other_trials'])} trial restarts resumed another "
                  "trial's checkpoint (recorded by the trainable; an exploit whose checkpoint Ray had not "
                  "registered yet restarts the trial from scratch with the new values).", ""]
    return "\n".join(lines)


def _layout_text(layout: list[dict]) -> str:
    return " / ".join(f"B{x['block_size']} b{x['branching']} k{x['top_k']} {x['branches']}" for x in layout)


def _layout_summary(layout: dict | None) -> dict | None:
    """The default layout's trial against the best-rewarded trained layout."""
    if not layout or not layout["history"]:
        return None
    history = layout["history"]
    default = next((h for h in history if h["default"]), None)
    chosen = max(history, key=lambda h: h["reward"])
    return {"trials": history, "default": default, "chosen": chosen,
            "policy_choice": layout["policy_choice"], "confirmation": layout.get("confirmation")}


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
    conf = ls.get("confirmation")
    if conf:
        lines += [f"### Confirmation: chosen vs default layout, retrained with seeds {conf['seeds']}", "",
                  "| layout | val bpb (mean ± std) | per seed |", "|---|---|---|"]
        for name, entry in conf["layouts"].items():
            b = entry["bpb"]
            lines.append(f"| {name}: {_layout_text(entry['layout'])} | {b['mean']:.4f} ± {b['std']:.4f} | "
                         + ", ".join(f"{v:.4f}" for v in b["values"]) + " |")
        if "welch" in conf:
            diff = conf["layouts"]["chosen"]["bpb"]["mean"] - conf["layouts"]["default"]["bpb"]["mean"]
            p = conf["welch"]["p"]
            lines += ["", f"Chosen minus default: {diff:+.4f} bpb (Welch p = "
                      f"{'n/a' if p is None else f'{p:.3f}'})."]
        lines.append("")
    return lines


def _plot(trials: list[dict], path: Path) -> None:
    with figure(path, figsize=(6.5, 4.2)) as (fig, ax):
        for i, t in enumerate(trials):
            if t["history"]:
                ax.plot([h["step"] for h in t["history"]], [h["bpb"] for h in t["history"]], "o-",
                        color=f"C{i % 10}", alpha=0.8, label=t["trial"])
        ax.set_xlabel("training step (an exploited trial jumps to its source's step)")
        ax.set_ylabel("validation bits per byte")
        ax.grid(True, alpha=0.3)
        if any(t["history"] for t in trials):
            ax.legend(fontsize=7)
