"""`bench generate`: CPU generation speed and peak memory, float vs int8 dynamic quantization.

Each mode runs in its own child process (peak RSS is per process): load the model (a checkpoint,
or a config built with random weights: speed and memory do not depend on the weights), then
greedily generate ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt through the same
next-token path as `pretrain generate` (recurrent models step; the others re-run the last
``model.seq_length`` tokens per token: no KV cache). Tokens/s counts the generated tokens over
the generation time (load and prompt excluded from neither: the first token includes the
prompt's forward pass, as a user would see it).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import provenance


def _load(ckpt: str | None, config: str | None, overrides: list[str], int8: bool):
    import torch

    from model import get_family

    from .. import parallel
    from ..config import load_config
    from ..generate import Generator

    if ckpt:
        gen = Generator(ckpt, int8=int8)
        return gen.model, gen.cfg
    cfg = load_config(config, overrides)
    if cfg.model.vocab_size == 0:
        raise ValueError("--config without --ckpt needs model.vocab_size set (no dataset is read)")
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = 1, 1, 0
    parallel.setup(cfg)
    torch.manual_seed(0)
    model = get_family(cfg.model.name).build(cfg.model, cfg.parallel).eval()
    if int8:
        from ..compress import quantize_int8
        model = quantize_int8(model)
    return model, cfg


def child(args: dict) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(args["threads"] or torch.get_num_threads())
    model, cfg = _load(args["ckpt"], args["config"], args["overrides"], args["int8"])
    ids = [(7 * i) % 200 + 1 for i in range(args["prompt_tokens"])]
    window = cfg.model.seq_length
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        start = time.perf_counter()
        if hasattr(model, "step"):
            state = model.initial_state(1)
            for token in ids:
                logits, state = model.step(torch.tensor([token]), state)
            for _ in range(args["new_tokens"]):
                ids.append(int(logits[0].argmax()))
                logits, state = model.step(torch.tensor([ids[-1]]), state)
        else:
            for _ in range(args["new_tokens"]):
                ids.append(int(model(torch.tensor([ids[-window:]]))[0, -1].argmax()))
        elapsed = time.perf_counter() - start
    return {"int8": args["int8"], "tokens_per_s": args["new_tokens"] / elapsed, "seconds": elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "float_params": params, "model": cfg.model.name, "seq_length": window,
            "threads": torch.get_num_threads()}


def run(ckpt: str | None, config: str | None, overrides: list[str], out: str, prompt_tokens: int,
        new_tokens: int, threads: int, command: str) -> dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = {}
    for int8 in (False, True):
        spec = {"ckpt": ckpt, "config": config, "overrides": overrides, "int8": int8,
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads}
        done = subprocess.run([sys.executable, "-c", "import json, sys; from pretrain.bench.generate import child; "
                               "print('RESULT ' + json.dumps(child(json.loads(sys.argv[1]))))", json.dumps(spec)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"generation child ({'int8' if int8 else 'float'}) failed:\n{done.stderr[-3000:]}")
        modes["int8" if int8 else "float"] = json.loads(lines[-1][len("RESULT "):])
        m = modes["int8" if int8 else "float"]
        print(f"{'int8' if int8 else 'float'}: {m['tokens_per_s']:.1f} tokens/s, peak RSS {m['peak_rss_mb']:.0f} MB",
              flush=True)
    results = {"benchmark": "generate", "command": command, "commit": provenance.commit(), "date": provenance.utc_now(),
               "hardware": provenance.hardware(), "ckpt": ckpt, "config": config, "overrides": overrides,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "modes": modes}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Generation on CPU: {modes['float']['model']}, {modes['float']['float_params']:,} parameters", "",
             f"`{command}`", "", f"Commit `{results['commit']}`, {results['date']}; "
             f"hardware: {provenance.describe(results['hardware'])}; {modes['float']['threads']} threads.", "",
             f"{prompt_tokens}-token prompt, {new_tokens} greedy tokens, context window {modes['float']['seq_length']}.", "",
             "| mode | tokens/s | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {name} | {m['tokens_per_s']:.1f} | {m['peak_rss_mb']:.0f} |" for name, m in modes.items()]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return results
