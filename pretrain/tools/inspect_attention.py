"""Where a FIM-Mistral checkpoint's attention goes, for one text: mass per branch (local, routed,
summaries per level) in each layer, one layer's weight map, and the routed blocks per query block.

The weights are those of the model's own q and k (captured from each layer's core attention
during a forward pass), laid out by ``fim_weights_reference``: exactly what the fast path
computes, as an explicit [tokens; summary units] matrix.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pretrain.core.checkpoint import CheckpointError
from pretrain.core.model_dir import CHECKPOINT_HELP
from pretrain.tools.plots import figure


def analyse(ckpt: str, text: str, layer: int | None = None) -> dict:
    from kernels.fim_geometry import route_blocks
    from kernels.fim_reference import fim_weights_reference
    from pretrain.tools.generate import Generator

    gen = Generator(ckpt)
    cfg = gen.cfg
    if cfg.model.name != "fim_mistral":
        raise CheckpointError(f"inspect-attention reads FIM attention; {ckpt} is {cfg.model.name}")
    ids = [int(i) for i in gen.tokenizer.encode(text.encode("utf-8"))][: cfg.model.seq_length]
    if len(ids) < 2:
        raise CheckpointError("--text must encode to at least 2 tokens")
    cores = gen.model.core_attentions()
    for core in cores:
        core.capture = []
    with torch.no_grad():
        gen.model(torch.tensor([ids]))
    layers = []
    for index, core in enumerate(cores):
        q, k = core.capture[0]
        core.capture = None
        geom, branches = core.geometry, core.branches
        probs, units, branch = fim_weights_reference(q.double(), k.double(), geom, branches)
        mass = {"local": float(probs[branch == 1].sum()), "routed": float(probs[branch == 2].sum())}
        n_tokens = probs.shape[-2] * probs.shape[1]  # queries x heads: masses become fractions
        for level in range(geom.levels):
            cols = [len(ids) + j for j, u in enumerate(units) if u[0] == level]
            mass[f"summary_level_{level}"] = float(probs[..., cols].sum()) if cols else 0.0
        mass = {key: value / n_tokens for key, value in mass.items()}
        routed = None
        if "routed" in branches and geom.top_k > 0 and len(ids) > geom.block:
            idx, valid = route_blocks(q, k, geom.block, geom.top_k)
            routed = [[[int(idx[0, h, c, s]) for s in range(idx.shape[-1]) if valid[c, s]]
                       for c in range(idx.shape[2])] for h in range(idx.shape[1])]
        layers.append({"layer": index, "block": geom.block, "branching": geom.branching,
                       "levels": geom.levels, "top_k": geom.top_k, "branches": list(branches),
                       "mass": mass, "routed_blocks_per_group": routed,
                       "_map": probs[0].mean(0).float(), "_units": units})
    text_shown = gen.tokenizer.decode(ids).decode("utf-8", errors="replace")
    return {"ckpt": ckpt, "tokens": len(ids), "text": text_shown, "layers": layers,
            "shown_layer": layer if layer is not None else len(layers) - 1}


def plot(result: dict, path: Path) -> None:
    layers = result["layers"]
    shown = layers[result["shown_layer"]]
    with figure(path, 1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1.6, 1]}, dpi=110) as (fig, axes):
        keys = sorted({k for entry in layers for k in entry["mass"]},
                      key=lambda k: ("local", "routed").index(k) if k in ("local", "routed") else 2 + int(k.rsplit("_", 1)[1]))
        bottom = [0.0] * len(layers)
        for key in keys:
            values = [entry["mass"].get(key, 0.0) for entry in layers]
            axes[0].bar(range(len(layers)), values, bottom=bottom, label=key.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("attention mass (mean over queries, heads)")
        axes[0].set_title("mass per branch / level")
        axes[0].legend(fontsize=8)

        weights, n = shown["_map"], result["tokens"]
        axes[1].imshow(weights.clamp(min=1e-4).log10().numpy(), aspect="auto", cmap="viridis",
                       interpolation="nearest")
        axes[1].axvline(n - 0.5, color="white", linewidth=0.8)
        axes[1].set_xlabel(f"key: {n} tokens | {len(shown['_units'])} summary units (levels 0..)")
        axes[1].set_ylabel("query position")
        axes[1].set_title(f"layer {shown['layer']}: log10 weight, mean over heads")

        routed = shown["routed_blocks_per_group"]
        if routed:
            blocks = len(routed[0])
            counts = torch.zeros(blocks, blocks)
            for group in routed:
                for c, chosen in enumerate(group):
                    for u in chosen:
                        counts[c, u] += 1
            axes[2].imshow(counts.numpy(), cmap="magma", origin="upper", interpolation="nearest")
            axes[2].set_xlabel("routed leaf block")
            axes[2].set_ylabel("query leaf block")
            axes[2].set_title(f"layer {shown['layer']}: KV groups routing to each block")
        else:
            axes[2].axis("off")
            axes[2].text(0.5, 0.5, "no routed branch in this layer / text", ha="center")
        fig.suptitle(f"FIM attention on {n} tokens of: {result['text'][:80]!r}", fontsize=10)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect-attention", help="PNG of a FIM checkpoint's attention on a text",
                       description="Runs a fim_mistral checkpoint on --text and plots the attention "
                                   "mass per branch and level in every layer, one layer's weight "
                                   "map over tokens and summary units, and the routed blocks; "
                                   "writes OUT (PNG) and the numbers beside it (OUT with .json).")
    p.add_argument("--ckpt", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--text", required=True, help="text to run (truncated to model.seq_length tokens)")
    p.add_argument("--out", default="attention.png", help="PNG path (default attention.png)")
    p.add_argument("--layer", type=int, default=None, help="layer for the weight map (default: last)")
    return p


def main(args) -> int:
    result = analyse(args.ckpt, args.text, args.layer)
    if not 0 <= result["shown_layer"] < len(result["layers"]):
        raise CheckpointError(f"--layer {args.layer}: the model has {len(result['layers'])} layers")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out)
    summary = {**result, "layers": [{k: v for k, v in e.items() if not k.startswith("_")}
                                    for e in result["layers"]]}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    for entry in summary["layers"]:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in entry["mass"].items())
        print(f"layer {entry['layer']}: {shares}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
