"""report.md and plots of `bench control`, rendered from results.json alone."""
from __future__ import annotations

from pathlib import Path

from pretrain.bench.provenance import describe, describe_dataset
from pretrain.research.stats import ALPHA
from pretrain.tools.plots import figure

LABELS = {"schedule": "warmup-cosine schedule", "qcontrol": "Q-learning controller", "pbt": "PBT (best of population)"}


def _pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def _plot(results: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4)) as (fig, (curves, scales)):
        for i, (name, arm) in enumerate(results["arms"].items()):
            for j, run in enumerate(arm["runs"]):
                pts = run["curve"][1:]  # step 0 is the uniform guess
                curves.plot([p["step"] for p in pts], [p["bpb"] for p in pts], "o-", color=f"C{i}", alpha=0.7,
                            ms=3, label=LABELS[name] if j == 0 else None)
        curves.set_xlabel("step")
        curves.set_ylabel("validation bpb (selection batches)")
        curves.set_title("validation bpb, one line per seed")
        curves.grid(True, alpha=0.3)
        curves.legend()
        for j, run in enumerate(results["arms"]["qcontrol"]["runs"]):
            decisions = run["qcontrol"]
            scales.step([d["step"] for d in decisions], [d["lr_scale"] for d in decisions], where="post",
                        label=f"seed {j}")
        scales.set_xlabel("step")
        scales.set_ylabel("LR factor on top of the schedule")
        scales.set_title("Q-learning controller's LR factor")
        scales.grid(True, alpha=0.3)
        scales.legend()


def _verdict(results: dict, name: str) -> str:
    arm, base = results["arms"][name], results["arms"]["schedule"]
    diff = arm["heldout_bpb"]["mean"] - base["heldout_bpb"]["mean"]
    p = arm["welch_heldout"]["p"]
    direction = "lower (better)" if diff < -5e-5 else "higher (worse)" if diff > 5e-5 else "different (equal means)"
    sig = ("n/a" if p is None else f"{p:.3f}") + (
        "" if p is None else (f", significant at {ALPHA}" if p < ALPHA else f", not significant at {ALPHA}"))
    return (f"{LABELS[name]}: held-out bpb {abs(diff):.4f} {direction} than the schedule "
            f"({_pm(arm['heldout_bpb'])} vs {_pm(base['heldout_bpb'])}; Welch p = {sig}).")


def write_report(results: dict, out_dir: Path) -> None:
    _plot(results, out_dir / "curves.png")
    arms, pop = results["arms"], results["pbt_population"]
    space = ", ".join(f"`{d['key']}` {d['distribution']} [{d['low']:g}, {d['high']:g}]"
                      for d in results["search_space"])
    q = results["qcontrol"]
    lines = [
        "# LR control: warmup-cosine schedule vs Q-learning controller vs PBT", "",
        f"`{results['command']}`", "",
        f"Commit `{results['commit']}`, {results['date']}; hardware: {describe(results['hardware'])}; "
        f"{results['total_minutes']:.1f} min.", "",
        "## Setup", "",
        f"- Model: `{results['model']}` from `{results['tune_config']}` (base config and overrides); "
        f"{results['steps']} steps = {results['tokens_per_model']:,} training tokens per model, "
        f"{results['seeds']} seeds; a seed gives every arm the same batches.",
        *([f"- Data: {describe_dataset(results['dataset'])}"] if "dataset" in results else []),
        f"- Schedule: peak LR {results['lr']:g}, {results['warmup_steps']} warm-up steps, cosine to "
        f"{results['min_lr']:g}.",
        f"- Q-learning controller: the same schedule times a factor in [{q['lr_scale_min']:g}, "
        f"{q['lr_scale_max']:g}] and beta1 in [{q['momentum_min']:g}, {q['momentum_max']:g}], one decision "
        f"every {q['every']} steps (epsilon {q['epsilon']:g} decaying x{q['epsilon_decay']:g}).",
        f"- PBT: {pop} models over {space}, exploit/explore every {results['pbt_interval']} "
        f"evaluations; the best model by final validation bpb is PBT's result. Equal token budget "
        f"**per model**: PBT's search trains {pop} x {results['tokens_per_model']:,} tokens in total.",
        f"- Scores: every arm's final model on {results['heldout_batches']} validation batches after the "
        f"first {results['selection_batches']} (those are the trainer's evaluation, on which PBT selects). "
        "The held-out number is the fair one; the selection number flatters PBT.", "",
        "## Result", "",
        "| arm | held-out bpb (mean ± std) | selection bpb (mean ± std) | Welch p vs schedule (held-out) | training tokens |",
        "|---|---|---|---|---|"]
    for name, arm in arms.items():
        p = arm.get("welch_heldout", {}).get("p")
        total = results["tokens_per_model"] * (pop if name == "pbt" else 1)
        lines.append(f"| {LABELS[name]} | {_pm(arm['heldout_bpb'])} | {_pm(arm['val_bpb'])} | "
                     f"{'—' if name == 'schedule' else ('n/a' if p is None else f'{p:.3f}')} | {total:,} |")
    lines += ["", _verdict(results, "qcontrol"), "", _verdict(results, "pbt"), "",
              "![curves](curves.png)", "", "## Per seed", "",
              "| seed | schedule | Q-controller | Q final LR factor | Q decisions (explored) | PBT | PBT best trial's final values | PBT exploits |",
              "|---|---|---|---|---|---|---|---|"]
    for seed in range(results["seeds"]):
        s, qr, pr = (arms[n]["runs"][seed] for n in ("schedule", "qcontrol", "pbt"))
        dec = qr["qcontrol"]
        final_scale = f"{dec[-1]['lr_scale']:.3g}" if dec else "n/a"
        values = ", ".join(f"`{k}`={v:.3g}" if isinstance(v, float) else f"`{k}`={v}"
                           for k, v in sorted(pr["best_config"].items()))
        lines.append(f"| {seed} | {s['heldout_bpb']:.4f} | {qr['heldout_bpb']:.4f} | {final_scale} | "
                     f"{len(dec)} ({sum(d['explored'] for d in dec)}) | {pr['heldout_bpb']:.4f} | {values} | "
                     f"{pr['exploits']} |")
    lines += ["", "Every PBT search's trials, exploit log and curves: `pbt-seed*/summary.md`.", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
