"""The training loop: data -> DeepSpeed engine -> metrics, evaluation in bits per byte,
checkpoints, and a clean stop on SIGINT / SIGTERM / SIGUSR1."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function

from data_pipeline.loader import StreamingLoader
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import ByteTokenizer
from pretrain.core import checkpoint, hf_init
from pretrain.core.config import ConfigError, RunConfig, load_config, save_config
from pretrain.core.evaluation import scores, validation_loader
from pretrain.core.global_batch import keep_global_batch
from pretrain.core.metrics import RunLogger
from pretrain.core.qcontrol import QController
from pretrain.core.steps import eval_losses, train_step
from pretrain.core.throughput import StartupClock, cached_probe_tflops, peak_memory_mb, retain_freed_host_memory

EXIT_OK = 0
EXIT_DIVERGED = 3   # train.max_skipped_steps updates in a row had non-finite gradients
EXIT_STOPPED = 75   # stopped by a signal after writing a checkpoint: run the same command to resume
# Fault injection for tests and drills: comma-separated steps whose loss is made NaN.
NAN_AT_STEPS_ENV = "PRETRAIN_NAN_LOSS_AT_STEPS"


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite updates; the message names the setting and what to try."""

# megatron's RoPE caches its table with lru_cache; compiled, it is recomputed (cheap)
warnings.filterwarnings("ignore", message=".*Dynamo detected a call to a `functools.lru_cache`-wrapped function.*")


class StopSignal:
    """Record SIGINT/SIGTERM/SIGUSR1; the loop checkpoints at the next step boundary.
    A second SIGINT aborts at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Tune trial's thread: Ray owns signals and stops the trial itself
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, world_size: int) -> bool:
        """Agreed across ranks: a signal delivered to one rank stops all of them together."""
        flag = self.signum
        if world_size > 1:
            t = torch.tensor([flag], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag != 0

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


VOCAB_MULTIPLE = 128


def dataset_tokenizer(cfg: RunConfig) -> dict:
    """The dataset's tokenizer description, checked against data.tokenizer."""
    info = read_manifest(cfg.data.path)["tokenizer"]
    if cfg.data.tokenizer != "auto" and info["kind"] != cfg.data.tokenizer:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} but {cfg.data.path} was prepared with "
                          f"the {info['kind']} tokenizer; prepare it with --tokenizer "
                          f"{cfg.data.tokenizer} or set data.tokenizer=auto")
    return info


def resolve_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    """model.vocab_size 0 -> the tokenizer's, padded to a multiple of 128. The padding must not
    depend on the layout: a TP=2 run has to be the same model as a TP=1 run."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset "
                          f"tokenizer's vocabulary ({tokenizer_vocab}); use 0 to take it from the data")


@torch.no_grad()
def evaluate(engine, cfg: RunConfig, layout) -> dict:
    """Validation loss (nats/token) and bits per byte over the first train.eval_batches batches
    of the validation split in stored order; data-parallel ranks take every dp-th batch, so the
    result is the same for any world size."""
    from megatron.core import parallel_state

    loader = validation_loader(cfg)
    totals = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    engine.eval()
    # a compiled model evaluates eagerly: compiling its no-grad graph (~20 s at the demo's shape)
    # costs more than a few dozen eager batches
    with torch.compiler.set_stance("force_eager") if cfg.train.compile else contextlib.nullcontext():
        for i, batch in zip(range(cfg.train.eval_batches), loader):
            if i % layout.dp != layout.dp_rank:
                continue
            labels = batch["labels"]
            nll = eval_losses(engine, batch, layout.device, pipelined=layout.pp > 1)
            totals += torch.stack([nll.cpu(), torch.tensor(labels.numel()),
                                   loader.target_bytes(labels).sum()]).double()
    engine.train()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return scores(cfg, *totals.tolist())


def skipped_shards(data: StreamingLoader) -> int:
    """Shards skipped as corrupt so far, over all data-parallel ranks and workers."""
    from megatron.core import parallel_state

    count = torch.tensor([data.skipped_shards], dtype=torch.int64)
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count.item())


def _resume_data(data: StreamingLoader, mine: dict, ckpt: Path) -> str | None:
    """This rank's saved loader state when the data layout is unchanged (exact resume); else the
    states of every saved rank, re-split (data_pipeline/reshard.py). Returns the reshard line."""
    if data.same_layout(mine):
        data.load_state_dict(mine)
        return None
    saved = [torch.load(p, weights_only=False)["data"] for p in sorted(ckpt.glob("extra_rank*.pt"))]
    return data.reshard_from(saved)


def _dp_mean(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(t, group=group)
    return t / dist.get_world_size(group)


class _Window:
    """Loss and byte sums since the last log line, kept on device: no host sync per step.
    Non-finite micro-batch losses (skipped updates) are left out of the average."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self):
        self.stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, finite, bytes
        self.steps = 0
        self.start = time.perf_counter()
        self.wall_before = 0.0  # seconds of this window spent before a resume
        self.restored_steps = 0  # of its steps, those taken before a resume

    def add(self, loss: torch.Tensor, nbytes: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.stats += torch.stack([torch.where(finite, loss, 0).double(), finite.double(),
                                   nbytes.to(self.device, non_blocking=True).double()])

    def reduce(self) -> tuple[int, float | None, int, float]:
        """(steps, mean loss or None if none was finite, bytes over all data-parallel ranks,
        wall seconds); then reset."""

        state = self.state_dict()
        self.reset()
        finite = state["finite"]
        return state["steps"], (state["loss_sum"] / finite if finite else None), int(state["bytes"]), state["wall_s"]

    def state_dict(self) -> dict:
        """The unlogged steps so far, summed over data-parallel ranks: a checkpoint carries them,
        so the first log line after a resume covers the same steps (and bytes) as without one."""
        from megatron.core import parallel_state

        stats = self.stats.clone()
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        loss_sum, finite, nbytes = stats.tolist()
        return {"steps": self.steps, "loss_sum": loss_sum, "finite": finite, "bytes": nbytes,
                "wall_s": self.wall_before + time.perf_counter() - self.start}

    def load_state_dict(self, state: dict, holds_sums: bool) -> None:
        """``holds_sums``: this rank carries the sums (one per data-parallel group), others zeros."""
        self.reset()
        if holds_sums:
            self.stats = torch.tensor([state["loss_sum"], state["finite"], state["bytes"]],
                                      dtype=torch.float64, device=self.device)
        self.steps, self.wall_before = state["steps"], state["wall_s"]
        self.restored_steps = state["steps"]


def _report_rank(layout, what: str) -> None:
    """One line from every rank of a multi-process run, so each node's log shows its own ranks
    got to the end (the run's log records come from rank 0 only)."""
    if layout.world_size > 1:
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(f"rank {layout.rank}/{layout.world_size} on {node}: {what}", flush=True)


def prepare_model(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> None:
    """What the trainer does to a built model before training: on CPU keep freed host memory
    (process-wide), and ``train.compile`` (inductor; on CPU its kernels launched from C++, less
    Python per step). ``bench train`` prepares its plain-loop model the same way."""
    if device.type == "cpu":
        retain_freed_host_memory()
    if cfg.train.compile:
        if device.type == "cpu":
            import torch._inductor.config as inductor_config
            inductor_config.cpp_wrapper = True
        model.compile()  # in place: parameter names, hence checkpoints, stay those of eager


def train(cfg: RunConfig, resume: str = "auto",
          on_step: Callable[[int, float], None] | None = None,
          on_eval: Callable[[int, dict, Path | None], None] | None = None) -> int:
    """Train to ``train.steps``; returns an exit status (EXIT_*). ``on_step(step, seconds)`` is
    called after every step with its wall time, evaluation and checkpointing included (bench
    train times and profiles steps through it). ``on_eval(step, result, checkpoint)`` follows
    every evaluation after step 0, with the checkpoint written at that step if any (`tune`
    reports through it)."""
    from model import get_family
    from pretrain.core import parallel, reshard
    from pretrain.core.engine import build_engine, reapply_optimizer_settings
    from pretrain.core.model_dir import build_model

    clock = StartupClock()
    family = get_family(cfg.model.name)
    tokenizer = dataset_tokenizer(cfg)
    resolve_vocab(cfg, tokenizer["vocab_size"])
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    t, seq = cfg.train, cfg.model.seq_length
    source = checkpoint.resolve(resume, run_dir)
    # a fresh start from transformers weights: checked here, before any process group starts
    pretrained = hf_init.open_checked(cfg) if t.init_from and source is None else None
    layout = parallel.setup(cfg)
    clock.mark("process groups")
    batch_kept = keep_global_batch(cfg, source[0] / source[1], layout.dp) if source is not None else None
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    d = cfg.data
    data = StreamingLoader(d.path, "train", seq, t.micro_batch_size, rank=layout.dp_rank,
                           world_size=layout.dp, num_workers=d.num_workers, seed=t.seed,
                           shuffle_buffer=d.shuffle_buffer, on_error=d.on_error,
                           mask_documents=d.mask_documents, window_order=d.window_order)
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    clock.mark("data")
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(layout.device)
    if pretrained is not None:  # before the engine: ZeRO partitions and copies the loaded weights
        loaded = hf_init.load_into(model, cfg, pretrained)
    prepare_model(model, cfg, layout.device)
    clock.mark("model")
    controller = QController(cfg.optim.qcontrol, cfg.optim.beta1) if cfg.optim.qcontrol.enabled else None
    engine = build_engine(cfg, model, layout,
                          lr_scale=(lambda: controller.lr_scale) if controller is not None else None)

    clock.mark("engine")
    step, tokens, nbytes, elapsed, skipped, skipped_in_a_row = 0, 0, 0, 0.0, 0, 0
    if source is not None:
        resumed = reshard.load(engine, source[0], source[1], cfg, layout)
        client, extra = resumed.client, resumed.extra
        step, tokens, nbytes, elapsed = (client["step"], client["tokens"], client["bytes"],
                                         client["elapsed_s"])
        skipped = client.get("nonfinite_skipped_steps", 0)
        skipped_in_a_row = client.get("nonfinite_in_a_row", 0)
        if client.get("tokenizer") != tokenizer.get("fingerprint"):
            raise checkpoint.CheckpointError(
                f"{source[0] / source[1]} was trained on tokenizer {client.get('tokenizer')!r}, but "
                f"{d.path} holds {tokenizer.get('fingerprint')!r}: resume on the same dataset")
        resharded = _resume_data(data, extra["data"], source[0] / source[1])
        checkpoint.set_rng_state(extra["rng"])
        if controller is not None and "qcontrol" in extra:
            controller.load_state_dict(extra["qcontrol"])
        reapply_optimizer_settings(cfg, engine, controller)
        clock.mark("resume")

    flops_per_token = family.training_flops_per_token(cfg.model)
    peak_tflops, probe_cached = t.peak_tflops, False
    if not peak_tflops:
        peak_tflops, probe_cached = cached_probe_tflops(
            layout.device, torch.bfloat16 if cfg.parallel.dtype == "bf16" else torch.float32)
    clock.mark("matmul probe")
    logger = RunLogger(cfg, run_dir, layout.is_main, step)
    if source is not None:
        logger.print(f"resumed from {source[0] / source[1]} at step {step}"
                     + (f" (train.init_from={t.init_from} is not read on a resume)" if t.init_from else ""))
        for line in (resumed.resharded, batch_kept, resharded):
            if line:
                logger.print(line)
    if pretrained is not None:
        logger.print(f"initialized from {t.init_from}: {loaded} tensors on rank 0")
    n_params = family.parameter_count(cfg.model)
    logger.print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters | world {layout.world_size} "
                 f"(tp {layout.tp}, pp {layout.pp}, dp {layout.dp}) | ZeRO {cfg.parallel.zero_stage} "
                 f"| {cfg.parallel.dtype} | run dir {run_dir}")
    if family.supports.describes_itself:  # e.g. fractal Mamba's drawn architecture
        logger.print(model.describe())
    origin = ("train.peak_tflops" if t.peak_tflops else
              "matmul probe, best of the runs on this machine" if probe_cached else "matmul probe")
    logger.print(f"MFU denominator: {peak_tflops:.3f} TFLOP/s per device ({origin}); "
                 f"{flops_per_token / 1e6:.1f} MFLOP per training token")

    def save(at_step: int) -> None:
        client = {"step": at_step, "tokens": tokens, "bytes": nbytes, "elapsed_s": elapsed,
                  "log_window": window.state_dict(),
                  # not "skipped_steps": DeepSpeed keeps a key of that name for itself
                  "nonfinite_skipped_steps": skipped, "nonfinite_in_a_row": skipped_in_a_row,
                  "tokenizer": tokenizer.get("fingerprint")}
        extra = {"data": data.state_dict(), "rng": checkpoint.rng_state()}
        if controller is not None:
            extra["qcontrol"] = controller.state_dict()
        path = checkpoint.save(engine, ckpt_dir, at_step, client, extra, cfg, t.keep_last)
        logger.print(f"checkpoint: {path}")
        return path

    def run_eval(at_step: int) -> dict:
        result = evaluate(engine, cfg, layout)
        logger.log({"step": at_step, "split": "val", **result, "tokens": tokens, "bytes": nbytes})
        logger.print(f"step {at_step}: val loss {result['loss']:.4f} | val bpb {result['bpb']:.4f}")
        return result

    tokens_per_step = t.micro_batch_size * t.grad_accum * layout.dp * seq
    nan_steps = {int(x) for x in os.environ.get(NAN_AT_STEPS_ENV, "").split(",") if x.strip()}
    stop = StopSignal()
    batches = iter(data)
    last_saved = step
    window = _Window(layout.device)
    if source is not None and "log_window" in client:
        window.load_state_dict(client["log_window"], holds_sums=layout.dp_rank == 0)

    def log_window() -> None:
        """One metrics record for the steps since the last one (one host sync per log line)."""
        nonlocal nbytes
        fresh = window.steps - window.restored_steps  # the progress bar started after the others
        steps, loss_avg, window_bytes, wall = window.reduce()
        nbytes += window_bytes
        tps = steps * tokens_per_step / wall
        tflops = tps * flops_per_token / layout.world_size / 1e12  # per device
        record = {"step": step, "loss": loss_avg, "lr": engine.get_lr()[0], "tokens": tokens,
                  "bytes": nbytes, "tokens_per_s": tps, "elapsed_s": elapsed,
                  "tflops_per_device": tflops, "mfu": tflops / peak_tflops,
                  "peak_mem_mb": peak_memory_mb(layout.device), "skipped_steps": skipped}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if d.on_error == "skip":
            record["data_skipped_shards"] = skipped_shards(data)
        if family.supports.training_metrics:  # e.g. FractalFormer's per-level losses
            record.update(model.log_metrics())
        logger.log(record)
        logger.advance(fresh, {"loss": f"{loss_avg:.3f}" if loss_avg is not None else "nan",
                               "tok/s": f"{tps:,.0f}", "mfu": f"{record['mfu']:.0%}"})

    try:
        if step >= t.steps:
            logger.print(f"run already complete at step {step} (train.steps={t.steps})")
            return EXIT_OK
        if step == 0 and t.eval_at_start:
            run_eval(0)
            clock.mark("step-0 eval")
        while step < t.steps:
            t0 = time.perf_counter()
            with record_function("phase/data"):
                micro_batches = [next(batches) for _ in range(t.grad_accum)]
            if clock is not None:
                clock.mark("first batch")
                logger.print(clock.line())
                clock = None
            losses = train_step(engine, micro_batches, layout.device, pipelined=layout.pp > 1,
                                poison=step + 1 in nan_steps)
            with record_function("phase/logging"):
                for loss, batch in zip(losses, micro_batches):
                    window.add(loss, data.target_bytes(batch["labels"]).sum())
            if not engine.was_step_applied():  # non-finite gradients: DeepSpeed skipped the update
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                if skipped_in_a_row > t.max_skipped_steps:
                    raise TrainingDiverged(
                        f"{skipped_in_a_row} updates in a row had non-finite gradients (limit "
                        f"train.max_skipped_steps={t.max_skipped_steps}) at step {step + 1}; the last "
                        f"checkpoint is {checkpoint.latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None}. "
                        "Lower optim.lr, raise optim.warmup_steps, or check the data")
            else:
                skipped_in_a_row = 0
            step += 1
            tokens += tokens_per_step
            elapsed += time.perf_counter() - t0
            window.steps += 1
            if controller is not None:
                decision = controller.observe(losses.mean(), engine.get_global_grad_norm(), _dp_mean)
                if decision is not None:
                    controller.apply(engine.lr_scheduler)
                    logger.log({"step": step, "split": "qcontrol", **decision})

            if step % t.log_every == 0 or step == t.steps:
                with record_function("phase/logging"):
                    log_window()
            evaluated, saved = None, None
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                with record_function("phase/evaluation"):
                    evaluated = run_eval(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.steps:
                with record_function("phase/checkpoint"):
                    saved = save(step)
                last_saved = step
            if on_eval is not None and evaluated is not None:
                on_eval(step, evaluated, saved)
            if on_step is not None:
                on_step(step, time.perf_counter() - t0)
            if stop.requested(layout.world_size):
                logger.advance(window.steps - window.restored_steps)  # unlogged steps travel in the checkpoint
                if step != last_saved:
                    save(step)
                logger.print(f"stopped by signal {stop.signum} at step {step}; run the same "
                             f"command again to resume")
                _report_rank(layout, f"stopped at step {step}")
                return EXIT_STOPPED
        result = run_eval(step)
        final = save(step) if step != last_saved else ckpt_dir / checkpoint.latest_tag(ckpt_dir)
        if on_eval is not None:
            on_eval(step, result, final)
        logger.print(f"done: {step} steps, {tokens:,} tokens, final val bpb {result['bpb']:.4f}, "
                     f"run dir {run_dir}")
        _report_rank(layout, f"finished at step {step}")
        return EXIT_OK
    finally:
        stop.restore()
        logger.close()
        parallel.teardown()


TRAIN_EPILOG = """\
examples:
  python -m pretrain train --config configs/mistral_tiny.yaml
  python -m pretrain train --config configs/mistral_tiny.yaml --set train.steps=50 --set optim.lr=1e-3
  python -m pretrain train --config configs/mistral_7b.yaml --dry-run --world-size 64
  torchrun --nproc_per_node 2 -m pretrain train --config configs/mistral_tiny.yaml

config keys (sections model, data, parallel, optim, train, log) are listed in configs/*.yaml,
pretrain/core/config.py and model/config.py (a family's own section: model/<family>/config.py);
an unknown key or bad value is an error naming it.

exit status: 0 done; 2 configuration/data/checkpoint error; 3 diverged (more than
train.max_skipped_steps updates in a row skipped for non-finite gradients); 75 stopped by
SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint (run the same command again to resume).
"""

def add_parser(sub) -> argparse.ArgumentParser:
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


def dry_run(cfg: RunConfig, world_size: int | None) -> int:
    """`train --dry-run`: validate the layout, print the parameter count and per-rank memory."""
    import os

    from model import get_family
    from pretrain.core.parallel import validate_layout
    from pretrain.core.sizing import estimate, format_estimate

    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or cfg.parallel.tp * cfg.parallel.pp
    validate_layout(cfg, world)
    if cfg.train.init_from:  # model.vocab_size 0 is compared once the data resolves it
        hf_init.open_checked(cfg)
    if cfg.model.vocab_size == 0:
        from data_pipeline.storage import is_url

        present = is_url(cfg.data.path) or (Path(cfg.data.path) / "manifest.json").is_file()
        vocab = read_manifest(cfg.data.path)["tokenizer"]["vocab_size"] if present else ByteTokenizer().vocab_size
        resolve_vocab(cfg, vocab)
    family = get_family(cfg.model.name)
    print(format_estimate(cfg.model.name, estimate(cfg, world, family.parameter_count(cfg.model))))
    return 0


def main(args) -> int:
    if args.world_size is not None and not args.dry_run:
        args.parser.error("--world-size is only meaningful with --dry-run")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg, args.world_size)
    return train(cfg, resume=args.resume)
