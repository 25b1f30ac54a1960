"""`python -m pretrain <verb>`: the stack's command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config

TRAIN_EPILOG = """\
examples:
  python -m pretrain train --config configs/mistral_tiny.yaml
  python -m pretrain train --config configs/mistral_tiny.yaml --set train.steps=50 --set optim.lr=1e-3
  python -m pretrain train --config configs/mistral_7b.yaml --dry-run --world-size 64
  torchrun --nproc_per_node 2 -m pretrain train --config configs/mistral_tiny.yaml

config keys (sections model, data, parallel, optim, train, log) are listed in configs/*.yaml
and pretrain/config.py; an unknown key or bad value is an error naming it.

exit status: 0 done; 2 configuration/data/checkpoint error; 3 diverged (more than
train.max_skipped_steps updates in a row skipped for non-finite gradients); 75 stopped by
SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint (run the same command again to resume).
"""


CKPT_HELP = "a run directory, its checkpoints/ directory (uses 'latest') or one step_* directory"


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a model (DeepSpeed engine over megatron-core)",
        description="Train a model from a YAML config. Writes <train.run_dir>/config.yaml, "
                    "metrics.jsonl, checkpoints/ (DeepSpeed layout + 'latest') and wandb/ "
                    "(offline unless WANDB_MODE says otherwise).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=100 (repeatable; values "
                        "are parsed as YAML)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto (default): continue from <run_dir>/checkpoints/latest if present; "
                        "never: start from step 0; PATH: a checkpoints dir or one step_* dir")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print parameter count and per-rank memory "
                        "estimate for the layout, allocate nothing, exit")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: total ranks to size for (default: tp x pp, or $WORLD_SIZE)")
    return p


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks that write OUT/results.json",
                       description="Measure, print a table and write OUT/results.json.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    d = what.add_parser("data", help="packed-sequence throughput of the loader, 1 and 2 workers",
                        description="Streams packed training batches from a prepared dataset with "
                                    "1 and then 2 DataLoader workers and reports MB/s of source "
                                    "bytes delivered, in total and per worker.")
    d.add_argument("--data", required=True, help="dataset directory written by data_pipeline prepare")
    d.add_argument("--out", required=True, help="output directory for results.json")
    d.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    d.add_argument("--micro-batch", type=int, default=8, help="sequences per batch (default 8)")
    d.add_argument("--seconds", type=float, default=5.0, help="timed seconds per run (default 5)")
    a = what.add_parser("attention", help="fwd+bwd time and memory vs sequence length: dense, "
                                          "sliding window, FIM",
                        description="Times forward+backward of dense causal SDPA, the baseline's "
                                    "sliding-window attention and FIM attention (and, with "
                                    "--methods dense_ours, dense attention as the models run it: "
                                    "on CPU our block-causal op up to 512 positions) at N = 2^k from "
                                    "--min-n to --max-n (each point in a fresh process), fits "
                                    "time ~ N^exponent over --fit-range, writes OUT/results.json "
                                    "and OUT/attention_scaling.png.")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--min-n", type=int, default=1024, help="smallest sequence length (default 1024)")
    a.add_argument("--max-n", type=int, default=32768, help="largest sequence length (default 32768)")
    a.add_argument("--fit-range", type=int, nargs=2, default=[4096, 16384], metavar=("LO", "HI"),
                   help="N range of the exponent fit (default 4096 16384)")
    a.add_argument("--repeats", type=int, default=3, help="timed calls per point, median (default 3)")
    a.add_argument("--memory-gb", type=float, default=16.0,
                   help="skip points estimated to need more memory (default 16)")
    a.add_argument("--methods", nargs="+", default=["dense", "sliding_window", "fim"],
                   choices=["dense", "sliding_window", "fim", "dense_ours"])
    for name, default, text in (("batch", 1, "batch size"), ("heads", 8, "query heads"),
                                ("kv-heads", 2, "key/value heads"), ("head-dim", 64, "head dim"),
                                ("window", 4096, "sliding window"), ("block", 64, "FIM leaf block"),
                                ("branching", 4, "FIM branching"), ("top-k", 2, "FIM routed blocks")):
        a.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    a.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    k = what.add_parser("kernels", help="fused kernels vs torch eager and torch.compile: time and "
                                        "bandwidth (Triton on CUDA; references only on CPU)",
                        description="Times forward+backward of each op in kernels/ (RMSNorm, "
                                    "SwiGLU, rotary, cross-entropy, FIM attention (also against "
                                    "dense causal SDPA), selective scan) as the torch reference (eager "
                                    "and torch.compile) and, on CUDA, as our Triton kernel. Writes "
                                    "OUT/results.json and OUT/table.md.")
    k.add_argument("--out", required=True, help="output directory")
    k.add_argument("--repeats", type=int, default=20, help="timed calls per point, median (default 20)")
    k.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   choices=["rmsnorm", "swiglu", "rotary", "cross_entropy", "fim_attention",
                            "selective_scan"],
                   help="only these ops (default: all)")
    t = what.add_parser("train", help="training tokens/s of our trainer vs transformers' Mistral, "
                                      "MFU and a per-phase breakdown",
                        description="Trains the config's Mistral shape with our trainer (data "
                                    "loader, DeepSpeed engine, metrics, train.compile as set) and "
                                    "with transformers' MistralForCausalLM (eager, same batches and "
                                    "optimizer) in this process; reports median step times, "
                                    "tokens/s, their ratio, FLOP/s and MFU, peak memory and where "
                                    "our step time goes. Writes OUT/results.json and OUT/table.md.",
                        epilog="example: python -m pretrain bench train --config "
                               "configs/bench_train_tiny.yaml --out reports/bench_train")
    t.add_argument("--config", required=True, help="a mistral run config (its data must be prepared)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    t.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    t.add_argument("--steps", type=int, default=20, help="timed steps, median (default 20)")
    t.add_argument("--profile-steps", type=int, default=5,
                   help="extra profiled steps of ours for the phase breakdown (default 5)")
    q = what.add_parser("control", help="LR control: warmup-cosine schedule vs the Q-learning controller "
                        "vs PBT, equal tokens per model, several seeds -> report.md",
                        description="Trains the base run of a PBT tune config three ways per seed: the "
                        "fixed schedule, the same with optim.qcontrol enabled, and a PBT search (best "
                        "model of the population). Scores every final model on validation batches past "
                        "those PBT selected on. Finished runs are reused; interrupted ones resume.")
    q.add_argument("--config", required=True, help="PBT tune YAML, e.g. configs/tune/control_tiny.yaml")
    q.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    q.add_argument("--out", required=True, help="report directory, e.g. reports/NAME")
    q.add_argument("--runs-dir", default="runs/control", help="where the single runs live (default runs/control)")
    q.add_argument("--heldout-batches", type=int, default=32,
                   help="validation batches scored after the selection batches (default 32)")
    g = what.add_parser("generate", help="CPU generation tokens/s and peak RSS, float vs int8",
                        description="Greedy generation in a child process per mode (float, int8 dynamic "
                        "quantization), from a checkpoint or from a config with random weights.")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help=CKPT_HELP + ", or an export/compress directory")
    source.add_argument("--config", help="run config YAML built with random weights (needs model.vocab_size)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a --config key (repeatable)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    g.add_argument("--new-tokens", type=int, default=256, help="generated tokens (default 256)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    g.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B",
                   help="sequences generated together, one or more sizes (default 1: one stream's latency)")
    c = what.add_parser("compare", help="baseline vs variants at equal data and budget -> report.md",
                        description="Trains the baseline and every variant config for --tokens "
                                    "tokens with seeds 0..S-1 (same data order per seed; finished "
                                    "runs with the same resolved config are reused), evaluates "
                                    "validation bpb, throughput, memory, passkey and MQAR "
                                    "accuracy, runs the attention scaling benchmark, tests each "
                                    "variant against the baseline (Welch) and the FIM design "
                                    "claims, and writes OUT/report.md, OUT/results.json and plots.")
    c.add_argument("--baseline", required=True, help="baseline config YAML")
    c.add_argument("--variant", action="append", required=True,
                   help="variant config YAML (repeatable); PATH:KEY=VALUE[,KEY=VALUE] adds overrides to "
                   "this arm only (an ablation)")
    c.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    c.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run (default 1M)")
    c.add_argument("--out", required=True, help="report directory, e.g. reports/NAME")
    c.add_argument("--runs-dir", default="runs/compare", help="where runs live (default runs/compare)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every arm (repeatable)")
    c.add_argument("--contexts", type=int, nargs="+", default=[128, 256],
                   help="context lengths of the retrieval tasks (default 128 256)")
    c.add_argument("--attention-max-n", type=int, default=16384,
                   help="largest N of the attention scaling benchmark (default 16384)")
    c.add_argument("--attention-fit", type=int, nargs=2, default=[4096, 16384], metavar=("LO", "HI"),
                   help="N range of the exponent fit (default 4096 16384)")
    return p


def _inspect_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect-attention", help="PNG of a FIM checkpoint's attention on a text",
                       description="Runs a fim_mistral checkpoint on --text and plots the attention "
                                   "mass per branch and level in every layer, one layer's weight "
                                   "map over tokens and summary units, and the routed blocks; "
                                   "writes OUT (PNG) and the numbers beside it (OUT with .json).")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--text", required=True, help="text to run (truncated to model.seq_length tokens)")
    p.add_argument("--out", default="attention.png", help="PNG path (default attention.png)")
    p.add_argument("--layer", type=int, default=None, help="layer for the weight map (default: last)")
    return p


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="consolidate a checkpoint into one safetensors file (or HF)",
                       description="Merge ZeRO and tensor-parallel shards of a checkpoint into one "
                                   "state dict. --format safetensors keeps our parameter names; "
                                   "--format hf writes config.json + model.safetensors that "
                                   "transformers.MistralForCausalLM.from_pretrained loads.")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    return p


def _generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="sample text from a checkpoint, streamed",
                       description="Load a checkpoint (any ZeRO / tensor-parallel layout, merged into "
                                   "one process) and sample a continuation of each prompt.")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--interactive", action="store_true",
                   help="after --prompt (if any), read one prompt per line from stdin until EOF")
    p.add_argument("--max-new-tokens", type=int, default=200, help="default 200")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: smallest set with this probability mass (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--entropy-aware", type=float, nargs=2, metavar=("CONFIDENT", "UNCERTAIN"),
                   help="per token by the entropy (bits) of its distribution: below CONFIDENT greedy, above "
                   "UNCERTAIN the full distribution, between top-k (--top-k, 40 if unset); e.g. 1 4")
    p.add_argument("--int8", action="store_true",
                   help="int8 dynamic quantization of the linear layers (CPU inference)")
    return p


def _compress_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compress", help="magnitude pruning + fine-tuning, int8 check -> a model generate loads",
                       description="Global magnitude pruning of the torch.nn.Linear weights, fine-tuning "
                       "of the rest on the run's training split (one process), then the masks are made "
                       "permanent. Writes OUT/model.safetensors, config.yaml and compress.json (val bpb "
                       "trained / pruned / fine-tuned / int8). `generate --ckpt OUT --int8` runs it quantized.")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prune", type=float, default=0.2, help="fraction of linear weights pruned (default 0.2)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps after pruning (default 100)")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning AdamW learning rate (default 3e-4)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per bpb (default 8)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning data order and RNG (default 0)")
    return p


def _continual_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("continual", help="online learning on a text stream with a hash-indexed memory (LIVEBSFIN)",
                       description="Reads --stream once, in order, in windows of the model's seq_length; each "
                       "context of --hash-span tokens gets an importance from a bounded hash memory (new: 1; "
                       "decayed per visit and per step since its last access) that scales its gradient within "
                       "[0.1, 1]. Reports bpb on the stream's held-out end and on the original validation split, "
                       "before and after. Writes OUT/model.safetensors, config.yaml, memory.json, continual.json, "
                       "report.md; `continual --ckpt OUT` resumes the memory.")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP + ", or an export/compress/continual directory")
    p.add_argument("--stream", required=True, help="text file to learn from")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of the stream's windows held out, at its end (default 0.1)")
    p.add_argument("--hash-span", type=int, default=32, help="tokens per hashed context (default 32)")
    p.add_argument("--memory-size", type=int, default=65536, help="contexts the memory holds (default 65536)")
    p.add_argument("--decay", type=float, default=0.999, help="importance decay per step since last access (default 0.999)")
    p.add_argument("--visit-decay", type=float, default=0.5, help="importance factor per visit (default 0.5)")
    p.add_argument("--no-memory", action="store_true", help="every token at full weight (the control)")
    p.add_argument("--eval-batches", type=int, default=8, help="original validation batches per bpb (default 8)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _dry_run(cfg, world_size: int | None) -> int:
    import os
    from pathlib import Path

    from data_pipeline.shards import read_manifest
    from data_pipeline.tokenizer import ByteTokenizer
    from model import get_family

    from .parallel import validate_layout
    from .sizing import estimate, format_estimate
    from .trainer import resolve_vocab

    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or cfg.parallel.tp * cfg.parallel.pp
    validate_layout(cfg, world)
    if cfg.model.vocab_size == 0:
        manifest = Path(cfg.data.path) / "manifest.json"
        vocab = (read_manifest(cfg.data.path)["tokenizer"]["vocab_size"] if manifest.is_file()
                 else ByteTokenizer().vocab_size)
        resolve_vocab(cfg, vocab)
    family = get_family(cfg.model.name)
    print(format_estimate(cfg.model.name, estimate(cfg, world, family.parameter_count(cfg.model))))
    return 0


TUNE_EPILOG = """\
examples:
  python -m pretrain tune --config configs/tune/pbt_tiny.yaml --out runs/tune-pbt
  python -m pretrain tune --config configs/tune/pbt_tiny.yaml --out runs/tune-pbt --resume
  python -m pretrain tune --config configs/tune/asha_tiny.yaml --address auto   # a running cluster
  sbatch --nodes 2 slurm/ray_cluster.sbatch python -m pretrain tune --config ... --address auto

The tune YAML names a base run config, overrides for every trial, the search space (any dotted
config key: loguniform / uniform / randint / choice), the scheduler (pbt, pb2, asha, fifo), the
number of trials and CPUs per trial. Trials report validation bpb at every train.eval_every.
"""


def _tune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tune", help="Ray Tune search over the trainer (PBT, PB2, ASHA)",
        description="Run a Ray Tune search whose trials are real training runs; writes OUT/experiment "
                    "(every trial's config, metrics, checkpoints), OUT/summary.md, summary.json, "
                    "best_config.yaml and curves.png.",
        epilog=TUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="tune YAML (configs/tune/*.yaml)")
    p.add_argument("--out", default="runs/tune", help="results directory (default runs/tune)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (e.g. auto, or host:port; default $RAY_ADDRESS, else a "
                        "local Ray limited to --num-cpus)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray's CPUs (default: all)")
    p.add_argument("--resume", action="store_true", help="continue the experiment in OUT (Tuner.restore)")
    return p


def _check_kernels_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check-kernels", help="compile every Triton kernel for NVIDIA GPUs (no GPU needed)",
        description="Runs each op of `bench kernels` forward and backward with Triton's NVIDIA "
                    "backend compiling (not launching) every kernel for each target, at the GPU "
                    "benchmark's shapes and the smaller CPU ones, in each dtype; prints registers, "
                    "spills and shared memory per kernel. Exit status 1 if a kernel does not "
                    "compile or does not fit a target (shared memory, registers per block). "
                    "Proves compilation, not numerics. Needs TRITON_INTERPRET unset.")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], metavar="CC",
                   help="compute capabilities, e.g. 80 (A100) 90 (H100/H200) 100 (B200); default 80 90")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                   choices=["bfloat16", "float16", "float32"], help="default: all three")
    p.add_argument("--ops", nargs="+", default=None,
                   choices=["rmsnorm", "swiglu", "rotary", "cross_entropy", "fim_attention", "selective_scan"],
                   help="default: all")
    p.add_argument("--out", default=None, help="also write OUT/results.json and OUT/table.md")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain",
                                     description="Distributed pretraining for fractal architectures.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _train_parser(sub)
    _bench_parser(sub)
    _export_parser(sub)
    _generate_parser(sub)
    _continual_parser(sub)
    _inspect_parser(sub)
    _tune_parser(sub)
    _compress_parser(sub)
    _check_kernels_parser(sub)
    args = parser.parse_args(argv)
    if args.verb == "generate" and args.prompt is None and not args.interactive:
        parser.error("generate needs --prompt TEXT and/or --interactive")

    from data_pipeline.shards import ShardError

    from .checkpoint import CheckpointError
    from .trainer import EXIT_DIVERGED, TrainingDiverged

    if args.verb == "bench":
        from .bench.provenance import busy_warning
        warning = busy_warning()
        if warning:
            print(warning, file=sys.stderr, flush=True)
    try:
        if args.verb == "bench" and args.what == "attention":
            from .bench import attention
            shape = attention.Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.window,
                                    args.block, args.branching, args.top_k, args.dtype)
            attention.run(args.out, args.min_n, args.max_n, shape, args.repeats, args.memory_gb,
                          tuple(args.methods), tuple(args.fit_range))
            return 0
        if args.verb == "bench" and args.what == "compare":
            import shlex

            from .bench import compare
            command = shlex.join(["python", "-m", "pretrain", *(argv if argv is not None else sys.argv[1:])])
            results = compare.run(args.baseline, args.variant, args.seeds, args.tokens, args.out,
                                  args.overrides, args.runs_dir, args.contexts, args.attention_max_n,
                                  tuple(args.attention_fit), command)
            print(f"report: {Path(args.out) / 'report.md'} ({results['total_minutes']:.1f} min)")
            return 0
        if args.verb == "bench" and args.what == "control":
            import shlex

            from .bench import control
            command = shlex.join(["python", "-m", "pretrain", *(argv if argv is not None else sys.argv[1:])])
            results = control.run(args.config, args.seeds, args.out, args.runs_dir, args.heldout_batches, command)
            print(f"report: {Path(args.out) / 'report.md'} ({results['total_minutes']:.1f} min)")
            return 0
        if args.verb == "bench" and args.what == "generate":
            import shlex

            from .bench import generate as bench_generate
            command = shlex.join(["python", "-m", "pretrain", *(argv if argv is not None else sys.argv[1:])])
            bench_generate.run(args.ckpt, args.config, args.overrides, args.out, args.prompt_tokens,
                               args.new_tokens, args.threads, command, tuple(args.batch))
            print(f"report: {Path(args.out) / 'report.md'}")
            return 0
        if args.verb == "bench" and args.what == "kernels":
            from .bench import kernels as bench_kernels
            bench_kernels.run(args.out, args.repeats, args.ops)
            return 0
        if args.verb == "bench" and args.what == "train":
            import shlex

            from .bench import train as bench_train
            command = shlex.join(["python", "-m", "pretrain", *(argv if argv is not None else sys.argv[1:])])
            bench_train.run(args.config, args.overrides, args.out, args.warmup, args.steps,
                            args.profile_steps, command)
            return 0
        if args.verb == "bench":
            from .bench import data as bench_data
            bench_data.run(args.data, args.out, args.seq_len, args.micro_batch, args.seconds)
            return 0
        if args.verb == "tune":
            import os

            from .tune import run as tune_run
            summary = tune_run(args.config, args.out, args.address or os.environ.get("RAY_ADDRESS"),
                               args.resume, args.num_cpus)
            best = summary["best"]
            print(f"summary: {Path(args.out) / 'summary.md'}; best val bpb "
                  f"{'n/a' if best is None else format(best['bpb'], '.4f')}")
            return 0
        if args.verb == "compress":
            from .compress import run as compress_run
            compress_run(args.ckpt, args.out, args.prune, args.finetune_steps, args.lr, args.eval_batches, args.seed)
            print(f"wrote {Path(args.out) / 'model.safetensors'} and compress.json")
            return 0
        if args.verb == "check-kernels":
            from .kernel_check import run as check_kernels
            return check_kernels(args.arch, args.dtypes, args.ops, args.out)
        if args.verb == "inspect-attention":
            from .inspect_attention import main as inspect_main
            return inspect_main(args)
        if args.verb == "generate":
            from .generate import main as generate_main
            return generate_main(args)
        if args.verb == "continual":
            from . import continual
            result = continual.run(args.ckpt, args.stream, args.out, args.lr, args.batch, args.holdout, args.hash_span,
                                   args.memory_size, args.decay, args.visit_decay, args.eval_batches,
                                   not args.no_memory, args.seed)
            print(f"report: {Path(args.out) / 'report.md'} (adaptation {result['adaptation_bpb']:+.4f} bpb, "
                  f"forgetting {result['forgetting_bpb']:+.4f} bpb)")
            return 0
        if args.verb == "export":
            from .export import export
            print(f"wrote {export(args.ckpt, args.out, args.format)}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.verb == "train":
            if args.world_size is not None and not args.dry_run:
                parser.error("--world-size is only meaningful with --dry-run")
            if args.dry_run:
                return _dry_run(cfg, args.world_size)
            from .trainer import train
            return train(cfg, resume=args.resume)
    except (ConfigError, ShardError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    return 1


if __name__ == "__main__":
    sys.exit(main())
