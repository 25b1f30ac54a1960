"""Training throughput: our trainer against transformers' MistralForCausalLM in one process.

Both train the config's model shape on the same batches with the same optimizer (fused AdamW,
the config's betas, weight decay on matrices only, the warmup-cosine LR schedule, gradient
clipping). Ours runs the real ``trainer.train`` (data loader, DeepSpeed engine, metrics, the
config's ``train.compile``); transformers runs eager, as its users train it, on batches already
in memory. A third side, the plain loop, trains our own model (same build and compile) with the
loop a PyTorch user writes: ours against it is the trainer's overhead. The three alternate step
by step, and step times are medians after warm-up. A few extra steps of ours run under
torch.profiler, and the ``phase/*`` ranges the trainer marks give the per-phase breakdown;
collectives found inside a phase are moved to "communication".

FLOPs per token: 6 x (parameters in matmuls) + 12 x layers x hidden x attended context (PaLM
convention, the same formula the trainer logs); MFU divides achieved FLOP/s by a matmul probe
measured in this run (CPU) or by the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from pretrain.bench import provenance
from pretrain.core.config import ConfigError, RunConfig, load_config
from pretrain.core.throughput import peak_memory_since, reset_peak_memory

FLOP_FORMULA = "6 * matmul_parameters + 12 * layers * hidden * min(seq, window)"
PHASES = ("data", "forward", "backward", "forward_backward", "optimizer", "communication",
          "logging", "evaluation", "checkpoint")
# Collectives as torch.profiler names them; time inside them is communication wherever it happens.
_COMM_PREFIXES = ("c10d::", "_c10d_functional::", "record_param_comms", "nccl:", "gloo:")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment.
GPU_BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                        "L40S": 362.1, "A10G": 70.0}


def peak_tflops(device) -> tuple[float, str]:
    """(peak per device, where it comes from)."""
    import torch

    from pretrain.core.throughput import matmul_probe_tflops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_BF16_PEAK_TFLOPS.items():
            if fragment in name:
                return peak, f"{name} dense bf16 peak (datasheet)"
        return matmul_probe_tflops(device, torch.bfloat16, 2.0), f"{name} bf16 matmul probe"
    return matmul_probe_tflops(device, torch.float32, 2.0), "fp32 1024x1024 matmul probe, this run"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_of(cfg: RunConfig, count: int) -> list[dict]:
    """The first ``count`` training batches of the config's data, as the trainer reads them."""
    from data_pipeline.loader import StreamingLoader

    t = cfg.train
    loader = StreamingLoader(cfg.data.path, "train", cfg.model.seq_length, t.micro_batch_size,
                             seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             window_order=cfg.data.window_order)
    return [batch for _, batch in zip(range(count), loader)]


class TransformersReference:
    """transformers' MistralForCausalLM (eager, sdpa attention) with our optimizer recipe, one
    training step per call; ``train.grad_accum`` micro-batches per step, batches in memory."""

    def __init__(self, cfg: RunConfig, device):
        import torch
        from transformers import MistralForCausalLM

        from model.mistral.hf import hf_config
        from pretrain.core.engine import lr_lambda, param_groups

        config = hf_config(cfg.model)
        config._attn_implementation = "sdpa"
        torch.manual_seed(cfg.train.seed)
        dtype = torch.bfloat16 if cfg.parallel.dtype == "bf16" else torch.float32
        self.model = MistralForCausalLM(config).to(device=device, dtype=dtype).train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.grad_clip = o.grad_clip
        self.micro = [{k: v.to(device) for k, v in b.items()}
                      for b in batches_of(cfg, cfg.train.grad_accum)]
        self.device = device

    def step(self) -> float:
        """One optimizer step; its wall time in seconds."""
        import torch

        _sync(self.device)
        start = time.perf_counter()
        for batch in self.micro:
            # transformers' own loss path (it shifts the labels itself: inputs are the targets)
            loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            (loss / len(self.micro)).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start


class PlainLoop:
    """The model our trainer builds (same build and seed, ``train.compile`` as the trainer applies
    it), trained by the loop a PyTorch user writes: forward, backward, ``clip_grad_norm_``, fused
    AdamW, the LR schedule, ``zero_grad``; batches in memory. What our step costs beyond this is
    the trainer's own overhead (engine, metrics, data). Needs megatron's parallel state (a
    one-rank gloo group) to build."""

    def __init__(self, cfg: RunConfig, device):
        import torch

        from pretrain.core.engine import lr_lambda, param_groups
        from pretrain.core.model_dir import build_model
        from pretrain.core.steps import model_inputs
        from pretrain.core.trainer import prepare_model

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg).to(device).train()
        prepare_model(self.model, cfg, device)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.grad_clip = o.grad_clip
        self.micro = [model_inputs(b, device) for b in batches_of(cfg, cfg.train.grad_accum)]
        self.device = device

    def step(self) -> float:
        """One optimizer step; its wall time in seconds."""
        import torch

        _sync(self.device)
        start = time.perf_counter()
        for batch in self.micro:
            loss = self.model(**batch).mean()
            (loss / len(self.micro)).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start


def phase_breakdown(events, step_seconds: list[float]) -> dict:
    """Seconds per step in each phase from the profiled steps' events; collectives move from
    the phase they happen in to "communication"; "other" is what no phase covers."""
    totals = {name: 0.0 for name in PHASES}
    phase_events = [e for e in events if e.name.startswith("phase/")]
    for e in phase_events:
        totals[e.name.removeprefix("phase/")] += e.time_range.elapsed_us() / 1e6

    def phase_of(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith(_COMM_PREFIXES):
                return False  # nested inside another collective: counted there
            if parent.name.startswith("phase/"):
                return parent.name.removeprefix("phase/")
            parent = parent.cpu_parent
        return None

    threads = {e.thread for e in phase_events}
    for e in events:
        if not e.name.startswith(_COMM_PREFIXES) or e.thread not in threads:
            continue
        phase = phase_of(e)
        if phase is False:
            continue
        seconds = e.time_range.elapsed_us() / 1e6
        totals["communication"] += seconds
        if phase is not None and phase != "communication":
            totals[phase] -= seconds
    n = len(step_seconds)
    step = sum(step_seconds) / n
    per_step = {name: value / n for name, value in totals.items() if value > 0}
    per_step["other"] = max(step - sum(per_step.values()), 0.0)
    return {"step_s": step, "seconds_per_step": per_step,
            "fraction": {name: value / step for name, value in per_step.items()}}


def lower_quartile(values: list[float]) -> float:
    """The step time a quarter of the steps beat: on a machine shared with other jobs, steps
    that ran while another process held a core are slower, never faster."""
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]


def time_all(cfg: RunConfig, warmup: int, steps: int, profile_steps: int, run_dir: Path,
             device) -> tuple[dict, dict, dict]:
    """Warm transformers and the plain loop up, then run ``trainer.train``: after each of our
    timed steps one transformers step and one plain-loop step run, so all three are timed under
    the same machine conditions (shared 2-core machines drift by 10% from minute to minute; the
    host-allocator setting the trainer applies on CPU is process-wide, so the others' timed steps
    run under it too). Then ``profile_steps`` profiled steps of ours give the phase breakdown.
    Peak memory: the rise during each side's warm-up steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from pretrain.core import parallel
    from pretrain.core.trainer import EXIT_OK, train

    sides = {}
    parallel.setup(cfg)  # the plain loop's megatron model needs it; train() finds it set up
    for name, side in (("hf", TransformersReference), ("plain", PlainLoop)):
        base = reset_peak_memory(device)
        sides[name] = side(cfg, device)
        for _ in range(warmup):
            sides[name].step()
        sides[name].result = {"peak_mem_mb": peak_memory_since(device, base), "step_times_s": []}
    hf, plain = sides["hf"].result, sides["plain"].result

    t = cfg.train
    t.steps = warmup + steps + 1 + profile_steps  # +1: the profiler's own warm-up step
    t.eval_every, t.checkpoint_every, t.eval_batches = 0, 0, 1
    t.run_dir = str(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ours: dict = {"step_times_s": []}
    times: list[float] = []
    base = reset_peak_memory(device)
    with profile(activities=activities,
                 schedule=schedule(wait=warmup + steps, warmup=1, active=profile_steps)) as prof:
        def on_step(step: int, seconds: float) -> None:
            times.append(seconds)
            if step == warmup:
                ours["peak_mem_mb"] = peak_memory_since(device, base)
            if warmup < step <= warmup + steps:
                ours["step_times_s"].append(seconds)
                hf["step_times_s"].append(sides["hf"].step())
                plain["step_times_s"].append(sides["plain"].step())
            prof.step()

        status = train(cfg, resume="never", on_step=on_step)
    if status != EXIT_OK:
        raise RuntimeError(f"our trainer exited with status {status}; see the output above")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    (run_dir.parent / "profile_ours.txt").write_text(
        f"torch.profiler, {profile_steps} steps of ours, operators by self CPU time\n{table}\n")
    ours["phases"] = phase_breakdown(prof.events(), times[-profile_steps:])
    for side in (ours, hf, plain):
        side["step_s"] = statistics.median(side["step_times_s"])
        side["step_p25_s"] = lower_quartile(side["step_times_s"])
    return ours, hf, plain


def run(config: str, overrides: list[str], out: str, warmup: int = 5, steps: int = 20,
        profile_steps: int = 5, command: str = "") -> dict:
    import torch

    from model import get_family
    from pretrain.core.trainer import dataset_tokenizer, resolve_vocab

    cfg = load_config(config, overrides)
    if not get_family(cfg.model.name).supports.hf_export:
        raise ConfigError(f"bench train compares against transformers' Mistral: {config} has "
                          f"model.name={cfg.model.name}; use a mistral config")
    resolve_vocab(cfg, dataset_tokenizer(cfg)["vocab_size"])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    family = get_family(cfg.model.name)
    flops_per_token = family.training_flops_per_token(cfg.model)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_length
    peak, peak_source = peak_tflops(device)
    print(f"bench train: {config} | {family.parameter_count(cfg.model) / 1e6:.2f}M parameters | "
          f"{tokens_per_step} tokens/step | {cfg.parallel.dtype} | compile={cfg.train.compile} | "
          f"peak {peak:.3f} TFLOP/s ({peak_source})", flush=True)

    print(f"{warmup} warm-up steps of transformers' MistralForCausalLM and of a plain PyTorch loop "
          f"over our model, then our trainer: {warmup} warm-up steps, {steps} timed steps each "
          f"followed by one transformers step and one plain-loop step, {profile_steps} profiled "
          f"steps", flush=True)
    ours, hf, plain = time_all(cfg, warmup, steps, profile_steps, out_dir / "run", device)

    def summary(side: dict) -> dict:
        tps = tokens_per_step / side["step_s"]
        return {"tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12,
                "mfu": tps * flops_per_token / 1e12 / peak}

    o, h, p = summary(ours), summary(hf), summary(plain)
    results = {
        "benchmark": "train", "command": command, "commit": provenance.commit(),
        "date": provenance.utc_now(), "hardware": provenance.hardware(), "config": config,
        "overrides": overrides, "resolved_config": cfg.to_dict(), "device": str(device),
        "tokens_per_step": tokens_per_step, "warmup_steps": warmup, "timed_steps": steps,
        "flop_formula": FLOP_FORMULA, "flops_per_token": flops_per_token,
        "peak_tflops": peak, "peak_source": peak_source,
        "ours_tokens_per_s": o["tokens_per_s"], "hf_tokens_per_s": h["tokens_per_s"],
        "ratio": o["tokens_per_s"] / h["tokens_per_s"], "mfu": o["mfu"], "hf_mfu": h["mfu"],
        "plain_tokens_per_s": p["tokens_per_s"], "vs_plain": o["tokens_per_s"] / p["tokens_per_s"],
        "ratio_p25": hf["step_p25_s"] / ours["step_p25_s"],
        "vs_plain_p25": plain["step_p25_s"] / ours["step_p25_s"],
        "ours": {**ours, **o}, "hf": {**hf, **h}, "plain": {**plain, **p},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = render_table(results)
    (out_dir / "table.md").write_text(table)
    print(table)
    print(f"results in {out_dir / 'results.json'}")
    return results


def render_table(r: dict) -> str:
    o, h, p = r["ours"], r["hf"], r["plain"]
    lines = [
        "| | ours | transformers | plain loop |", "|---|---:|---:|---:|",
        f"| step (median of {r['timed_steps']}) | {o['step_s'] * 1e3:.1f} ms | "
        f"{h['step_s'] * 1e3:.1f} ms | {p['step_s'] * 1e3:.1f} ms |",
        f"| step (lower quartile) | {o['step_p25_s'] * 1e3:.1f} ms | {h['step_p25_s'] * 1e3:.1f} ms | "
        f"{p['step_p25_s'] * 1e3:.1f} ms |",
        f"| tokens/s | {o['tokens_per_s']:,.0f} | {h['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} |",
        f"| TFLOP/s | {o['tflops']:.3f} | {h['tflops']:.3f} | {p['tflops']:.3f} |",
        f"| MFU | {o['mfu']:.1%} | {h['mfu']:.1%} | {p['mfu']:.1%} |",
        f"| peak memory | {o['peak_mem_mb']:,.0f} MB | {h['peak_mem_mb']:,.0f} MB | "
        f"{p['peak_mem_mb']:,.0f} MB |",
        "", f"ours / transformers: **{r['ratio']:.3f}x** tokens/s; ours / plain loop over our "
            f"model: **{r['vs_plain']:.3f}x** (at the lower-quartile step times: {r['ratio_p25']:.3f}x "
            f"and {r['vs_plain_p25']:.3f}x; other jobs on the machine only ever slow a step). "
            f"FLOPs/token "
            f"{r['flops_per_token'] / 1e6:.2f}M ({r['flop_formula']}); peak {r['peak_tflops']:.3f} "
            f"TFLOP/s ({r['peak_source']}).", "",
        f"Our step by phase ({len(o['step_times_s'])} timed steps; breakdown from the profiled steps):",
        "", "| phase | ms/step | share |", "|---|---:|---:|",
    ]
    phases = o["phases"]
    for name, seconds in phases["seconds_per_step"].items():
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {phases['fraction'][name]:.1%} |")
    data_logging = phases["fraction"].get("data", 0) + phases["fraction"].get("logging", 0)
    lines += ["", f"data + logging: {data_logging:.2%} of the step."]
    return "\n".join(lines) + "\n"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="training tokens/s of our trainer vs transformers' Mistral, "
                                     "MFU and a per-phase breakdown",
                       description="Trains the config's Mistral shape with our trainer (data "
                                   "loader, DeepSpeed engine, metrics, train.compile as set) and "
                                   "with transformers' MistralForCausalLM (eager, same batches and "
                                   "optimizer) in this process; reports median step times, "
                                   "tokens/s, their ratio, FLOP/s and MFU, peak memory and where "
                                   "our step time goes. Writes OUT/results.json and OUT/table.md.",
                       epilog="example: python -m pretrain bench train --config "
                              "configs/bench_train_tiny.yaml --out reports/bench_train")
    p.add_argument("--config", required=True, help="a mistral run config (its data must be prepared)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps, median (default 20)")
    p.add_argument("--profile-steps", type=int, default=5,
                   help="extra profiled steps of ours for the phase breakdown (default 5)")
    return p


def main(args) -> int:
    run(args.config, args.overrides, args.out, args.warmup, args.steps, args.profile_steps, args.command)
    return 0
