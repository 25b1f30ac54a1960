"""`bench generate`: CPU generation speed and peak memory: float vs int8 dynamic quantization,
cached vs re-run decoding.

Each (mode, decoding, batch) runs in its own child process (peak RSS is per process): load the
model (a checkpoint, or a config built with random weights: speed and memory do not depend on
the weights), then greedily generate ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt for
``batch`` independent sequences. Decoding ``cached`` is `pretrain generate`'s path for families
with incremental decoding (a state carried per token: a recurrence, KV caches; the prompt fed
token by token as generate does); ``rerun`` re-runs the last ``model.seq_length`` tokens per new
token (the path of the other families), so the two side by side give the cache's gain. Tokens/s
counts every sequence's generated tokens over the generation time, the prompt included (as a
user would see it); batch 1 is the latency of one stream, larger batches the throughput of a
server.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pretrain.bench import provenance
from pretrain.core.model_dir import CHECKPOINT_HELP


def _load(ckpt: str | None, config: str | None, overrides: list[str], int8: bool):
    import torch

    from pretrain.core.config import load_config
    from pretrain.core.model_dir import build_single_process
    from pretrain.tools.generate import Generator

    if ckpt:
        gen = Generator(ckpt, int8=int8)
        return gen.model, gen.cfg
    cfg = load_config(config, overrides)
    if cfg.model.vocab_size == 0:
        raise ValueError("--config without --ckpt needs model.vocab_size set (no dataset is read)")
    torch.manual_seed(0)
    model = build_single_process(cfg).eval()
    if int8:
        from pretrain.tools.quantize import quantize_int8
        model = quantize_int8(model, cfg.model)
    return model, cfg


def child(args: dict) -> dict:
    import resource
    import time

    import torch

    from model import get_family
    from pretrain.tools import generate, quantize  # noqa: F401  the code generation needs, before any model
    torch.set_num_threads(args["threads"] or torch.get_num_threads())
    runtime_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, cfg = _load(args["ckpt"], args["config"], args["overrides"], args["int8"])
    batch, window = args["batch"], cfg.model.seq_length
    ids = torch.tensor([[(7 * i + 13 * row) % 200 + 1 for i in range(args["prompt_tokens"])] for row in range(batch)])
    params = sum(p.numel() for p in model.parameters())
    if args["decode"] == "cached" and not get_family(cfg.model.name).supports.incremental_decoding:
        raise ValueError(f"--decode cached: {cfg.model.name} has no incremental decoding")
    with torch.no_grad():
        start = time.perf_counter()
        if args["decode"] == "cached":
            state = model.initial_state(batch)
            for t in range(ids.shape[1]):
                logits, state = model.step(ids[:, t], state)
            for _ in range(args["new_tokens"]):
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
                logits, state = model.step(ids[:, -1], state)
        else:
            for _ in range(args["new_tokens"]):
                ids = torch.cat([ids, model(ids[:, -window:])[:, -1].argmax(-1, keepdim=True)], 1)
        elapsed = time.perf_counter() - start
    return {"int8": args["int8"], "decode": args["decode"], "batch": batch, "tokens_per_s": batch * args["new_tokens"] / elapsed,
            "seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "runtime_rss_mb": runtime_rss_mb, "float_params": params, "model": cfg.model.name,
            "seq_length": window, "threads": torch.get_num_threads()}


def _run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", "import json, sys; from pretrain.bench.generate import child; "
                           "print('RESULT ' + json.dumps(child(json.loads(sys.argv[1]))))", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        mode = "int8" if spec["int8"] else "float"
        raise RuntimeError(f"generation child ({mode}, {spec['decode']}, batch {spec['batch']}) failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def default_decodes(ckpt: str | None, config: str | None, overrides: list[str]) -> tuple[str, ...]:
    """Both decodings where the family has incremental decoding, else the re-run alone."""
    from model import get_family
    from pretrain.core.config import load_config
    from pretrain.core.model_dir import load_run_config

    cfg = load_run_config(ckpt) if ckpt else load_config(config, overrides)
    return ("cached", "rerun") if get_family(cfg.model.name).supports.incremental_decoding else ("rerun",)


def run(ckpt: str | None, config: str | None, overrides: list[str], out: str, prompt_tokens: int,
        new_tokens: int, threads: int, command: str, batches: tuple[int, ...] = (1,),
        modes: tuple[str, ...] = ("float", "int8"), decodes: tuple[str, ...] | None = None) -> dict:
    if any(b < 1 for b in batches) or prompt_tokens < 1 or new_tokens < 1:
        raise ValueError("--batch, --prompt-tokens and --new-tokens must be positive")
    decodes = decodes or default_decodes(ckpt, config, overrides)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for batch in batches:
        for mode in modes:
            for decode in decodes:
                m = _run_child({"ckpt": ckpt, "config": config, "overrides": overrides, "int8": mode == "int8",
                                "decode": decode, "batch": batch, "prompt_tokens": prompt_tokens,
                                "new_tokens": new_tokens, "threads": threads})
                m["mode"] = mode
                runs.append(m)
                print(f"{mode}, {decode}, batch {batch}: {m['tokens_per_s']:.1f} tokens/s, peak RSS "
                      f"{m['peak_rss_mb']:.0f} MB ({m['runtime_rss_mb']:.0f} MB before the model loads)", flush=True)
    gains = [{"mode": c["mode"], "batch": c["batch"], "cached_over_rerun": c["tokens_per_s"] / r["tokens_per_s"]}
             for c in runs if c["decode"] == "cached"
             for r in runs if r["decode"] == "rerun" and (r["mode"], r["batch"]) == (c["mode"], c["batch"])]
    results = {"benchmark": "generate", "command": command, "commit": provenance.commit(), "date": provenance.utc_now(),
               "hardware": provenance.hardware(), "ckpt": ckpt, "config": config, "overrides": overrides,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "gains": gains}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    first = runs[0]
    lines = [f"# Generation on CPU: {first['model']}, {first['float_params']:,} parameters", "",
             f"`{command}`", "", f"Commit `{results['commit']}`, {results['date']}; "
             f"hardware: {provenance.describe(results['hardware'])}; {first['threads']} threads.", "",
             f"{prompt_tokens}-token prompt, {new_tokens} greedy tokens per sequence, context window "
             f"{first['seq_length']}. Tokens/s counts every sequence of the batch. Decoding `cached` carries "
             "a state per token (KV caches, a recurrence), `rerun` re-runs the context window per token.", "",
             "Peak RSS is the whole process; the runtime column is its peak before the model loads "
             "(torch and this code imported), so the difference is what the model and generation cost.", "",
             "| mode | decoding | batch | tokens/s | peak RSS (MB) | runtime RSS (MB) | model + generation (MB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['mode']} | {m['decode']} | {m['batch']} | {m['tokens_per_s']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{m['runtime_rss_mb']:.0f} | {m['peak_rss_mb'] - m['runtime_rss_mb']:.0f} |" for m in runs]
    if gains:
        lines += ["", "Cached over re-run tokens/s: " + ", ".join(
            f"{g['mode']} batch {g['batch']}: {g['cached_over_rerun']:.1f}x" for g in gains) + "."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="CPU generation tokens/s and peak RSS, float vs int8",
                       description="Greedy generation in a child process per mode (float, int8 dynamic "
                       "quantization), from a checkpoint or from a config with random weights.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help=CHECKPOINT_HELP + ", or an export/compress directory")
    source.add_argument("--config", help="run config YAML built with random weights (needs model.vocab_size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a --config key (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens (default 256)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B",
                   help="sequences generated together, one or more sizes (default 1: one stream's latency)")
    p.add_argument("--modes", nargs="+", choices=["float", "int8"], default=["float", "int8"],
                   help="weights: float and/or int8 dynamic quantization (default both; megatron-core "
                   "families have no nn.Linear to quantize: --modes float)")
    p.add_argument("--decode", nargs="+", choices=["cached", "rerun"],
                   help="decoding: cached (incremental: KV caches, a recurrence) and/or rerun (the context "
                   "window per token); default both where the family decodes incrementally, else rerun")
    return p


def main(args) -> int:
    run(args.ckpt, args.config, args.overrides, args.out, args.prompt_tokens, args.new_tokens, args.threads,
        args.command, tuple(args.batch), tuple(args.modes), tuple(args.decode) if args.decode else None)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
