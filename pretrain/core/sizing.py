"""Parameter count and per-rank memory estimate for a layout, without allocating the model.

Memory per rank (bytes), for the pipeline stage holding the most parameters:
  weights     P_stage/tp x w          (w = 2 for bf16, 4 for fp32; /dp under ZeRO-3)
  gradients   P_stage/tp x w          (/dp under ZeRO-2 and 3)
  optimizer   P_stage/tp x (8 + 4 if bf16 master weights)   AdamW moments; Lion: 4, one moment
              (/dp under ZeRO >= 1)
  activations per layer s*b*h*(10 + 24/tp) x w/2, with fused (flash/SDPA) attention and no
              recomputation (Korthikanti et al., 2022); the first stage holds pp micro-batches
              in flight under 1F1B, so it stores all L layers' worth; plus fp32 logits s*b*V*4/tp.
An estimate for planning, not a guarantee: allocator slack and communication buffers come on top.
"""
from __future__ import annotations

from pretrain.core.config import RunConfig


def estimate(cfg: RunConfig, world_size: int, param_count: int) -> dict:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    dp = max(1, world_size // (tp * pp))
    h, V, L = m.hidden_size, m.vocab_size, m.num_layers
    embed = V * h
    per_layer = (param_count - embed - h - (0 if m.tie_embeddings else embed)) / L
    first = embed + per_layer * L / pp
    last = per_layer * L / pp + h + (0 if m.tie_embeddings else embed)
    stage = (max(first, last) if pp > 1 else param_count) / tp
    w = 2 if p.dtype == "bf16" else 4
    weights = stage * w / (dp if p.zero_stage == 3 else 1)
    grads = stage * w / (dp if p.zero_stage >= 2 else 1)
    moments = 4 if cfg.optim.name in ("lion", "sgd") else 8     # one moment (fp32) or two
    optim = stage * (moments + (4 if p.dtype == "bf16" else 0)) / (dp if p.zero_stage >= 1 else 1)
    s, b = m.seq_length, t.micro_batch_size
    activations = s * b * h * (10 + 24 / tp) * (w / 2) * L + s * b * V * 4 / tp
    gib = 2**30
    return {"parameters": param_count, "world_size": world_size, "tp": tp, "pp": pp, "dp": dp,
            "zero_stage": p.zero_stage, "dtype": p.dtype,
            "per_rank_gib": {"weights": weights / gib, "gradients": grads / gib,
                             "optimizer": optim / gib, "activations": activations / gib,
                             "total": (weights + grads + optim + activations) / gib}}


def format_estimate(name: str, est: dict) -> str:
    lines = [f"model {name}: {est['parameters']:,} parameters ({est['parameters'] / 1e9:.3f} B)",
             f"layout: world {est['world_size']} = tp {est['tp']} x pp {est['pp']} x dp {est['dp']}, "
             f"ZeRO {est['zero_stage']}, {est['dtype']}",
             "estimated memory per rank (GiB):"]
    for key, value in est["per_rank_gib"].items():
        lines.append(f"  {key:<12}{value:10.2f}")
    return "\n".join(lines)
