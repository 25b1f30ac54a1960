"""Q-learning control of the learning rate and momentum (the design's "EnhancedSGD" controller),
for any optimizer with ``lr`` and ``betas`` (AdamW, Lion) or ``momentum`` (SGD).

Every ``every`` steps the controller closes a window: it reads the window's mean loss (averaged
over data-parallel ranks, so every rank decides the same), the relative loss change since the
previous window and the gradient-norm coefficient of variation, and forms a discrete state with
its current LR-scale and momentum buckets. The reward for the previous action is the loss
improvement (percent) minus ``stability_weight`` x the gradient-norm variation; one tabular
Q-learning update follows, then an epsilon-greedy action scales the LR factor (applied on top of
the schedule) and the momentum within their bounds. Everything it holds (Q-table, factors, RNG,
the open window) is in ``state_dict`` and goes into the checkpoint: a resumed run decides the same.
"""
from __future__ import annotations

import math
import random
from itertools import product

import torch

from pretrain.core.config import QControlConfig

LR_FACTORS = (0.7, 1.0, 1.4)
MOMENTUM_FACTORS = (0.98, 1.0, 1.02)
ACTIONS = tuple(product(LR_FACTORS, MOMENTUM_FACTORS))   # 9 actions


def _bucket(value: float, edges: tuple[float, ...]) -> int:
    return sum(value >= edge for edge in edges)


class QController:
    def __init__(self, cfg: QControlConfig, momentum: float):
        self.cfg = cfg
        self.q: dict[str, list[float]] = {}
        self.lr_scale, self.momentum, self.epsilon = 1.0, momentum, cfg.epsilon
        self.rng = random.Random(cfg.seed)
        self.previous: tuple[str, int] | None = None   # state and action awaiting their reward
        self.last_loss: float | None = None
        self.window: list[tuple[torch.Tensor, torch.Tensor | float | None]] = []
        self.decisions = 0

    def state(self, trend: float, variation: float) -> str:
        """trend: relative loss decrease per window; variation: grad-norm std / mean."""
        t = _bucket(trend, (-0.01, 0.001, 0.01))                 # worse / flat / better / much better
        g = _bucket(variation, (0.1, 0.3))
        lr = min(max(round(math.log2(self.lr_scale)), -3), 2)  # LR factor in octaves
        span = self.cfg.momentum_max - self.cfg.momentum_min
        m = 1 if span == 0 else _bucket((self.momentum - self.cfg.momentum_min) / span, (1 / 3, 2 / 3))
        return f"trend{t}-gnorm{g}-lr{lr:+d}-mom{m}"

    def observe(self, loss: torch.Tensor, grad_norm, reduce=None) -> dict | None:
        """Record one step; at the end of a window decide and return the decision (else None).
        ``reduce(tensor)`` averages a tensor over data-parallel ranks (None: one rank)."""
        self.window.append((loss.detach().float().reshape(()), grad_norm))
        if len(self.window) < self.cfg.every:
            return None
        losses = torch.stack([loss for loss, _ in self.window]).cpu()
        norms = torch.tensor([float(n) for _, n in self.window if n is not None] or [0.0])
        self.window = []
        stats = torch.stack([losses[torch.isfinite(losses)].mean(), norms.std() / norms.mean().clamp_min(1e-12)
                             if len(norms) > 1 else torch.tensor(0.0)]).double()
        if reduce is not None:
            stats = reduce(stats)
        window_loss, variation = (float(x) for x in stats)
        if not math.isfinite(window_loss):
            window_loss = self.last_loss if self.last_loss is not None else 0.0
        trend = 0.0 if self.last_loss is None else (self.last_loss - window_loss) / max(abs(self.last_loss), 1e-12)
        state = self.state(trend, variation)
        values = self.q.setdefault(state, [0.0] * len(ACTIONS))
        reward = None
        if self.previous is not None:
            reward = 100.0 * trend - self.cfg.stability_weight * variation
            prev_state, prev_action = self.previous
            old = self.q[prev_state][prev_action]
            self.q[prev_state][prev_action] = old + self.cfg.alpha * (reward + self.cfg.gamma * max(values) - old)
        explore = self.rng.random() < self.epsilon
        if explore:
            action = self.rng.randrange(len(ACTIONS))
        else:
            best = max(values)
            action = self.rng.choice([i for i, v in enumerate(values) if v == best])
        lr_factor, momentum_factor = ACTIONS[action]
        c = self.cfg
        self.lr_scale = min(max(self.lr_scale * lr_factor, c.lr_scale_min), c.lr_scale_max)
        self.momentum = min(max(self.momentum * momentum_factor, c.momentum_min), c.momentum_max)
        self.epsilon = max(c.epsilon_min, self.epsilon * c.epsilon_decay)
        self.previous, self.last_loss = (state, action), window_loss
        self.decisions += 1
        return {"state": state, "action": action, "lr_factor": lr_factor,
                "momentum_factor": momentum_factor, "explored": explore, "reward": reward,
                "window_loss": window_loss, "grad_norm_variation": variation,
                "lr_scale": self.lr_scale, "momentum": self.momentum, "epsilon": self.epsilon,
                "q_states": len(self.q)}

    def apply(self, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Set the momentum on every parameter group of the scheduler's optimizer, and its LR at
        once (the schedule multiplies ``lr_scale`` in; it would otherwise apply a step later)."""
        from pretrain.core.engine import set_lr_from_schedule

        set_lr_from_schedule(scheduler)
        for group in scheduler.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (self.momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = self.momentum

    def state_dict(self) -> dict:
        window = [(float(loss), None if n is None else float(n)) for loss, n in self.window]
        return {"q": {k: list(v) for k, v in self.q.items()}, "lr_scale": self.lr_scale,
                "momentum": self.momentum, "epsilon": self.epsilon, "rng": self.rng.getstate(),
                "previous": self.previous, "last_loss": self.last_loss, "window": window,
                "decisions": self.decisions}

    def load_state_dict(self, state: dict) -> None:
        self.q = {k: list(v) for k, v in state["q"].items()}
        self.lr_scale, self.momentum, self.epsilon = state["lr_scale"], state["momentum"], state["epsilon"]
        self.rng.setstate(state["rng"])
        self.previous = tuple(state["previous"]) if state["previous"] is not None else None
        self.last_loss, self.decisions = state["last_loss"], state["decisions"]
        self.window = [(torch.tensor(loss), n) for loss, n in state["window"]]
