"""FIM layout search: a REINFORCE policy over per-layer FIM settings, trained through Ray Tune.

The agent is a policy-gradient bandit (one episode = one training run): per layer and per FIM
setting (block size, branching, top-k, branches) an independent softmax over the configured
choices. Each trial trains FIM-Mistral with a sampled layout (``model.fim.layers``); its reward
is ``-(final val bpb) - flops_weight * log2(training FLOPs per token / the default layout's)``:
better bpb per training FLOP scores higher. After every finished trial the logits move along
``(reward - running baseline) * grad log p(layout)``. The first trial always trains the default
layout, so the summary can state the chosen layout's bpb against the default's.

Why a bandit and not a sequential RL agent: a layout is chosen once per run and the only signal
is the end-of-run bpb, so there is no state to transition; REINFORCE over independent
categoricals is the simplest unbiased estimator for that, and its state (logits, baseline) is a
few numbers that go into Ray's searcher checkpoint.
"""
from __future__ import annotations

import math
import random

from ray.tune.search import Searcher

from pretrain.research.tune_spec import SETTINGS, LayoutSearchSpec, trial_config


class LayoutPolicy:
    """Independent softmaxes per (layer, setting); REINFORCE with a running-mean baseline."""

    def __init__(self, spec: LayoutSearchSpec, num_layers: int, seed: int):
        self.spec, self.num_layers = spec, num_layers
        self.logits = [{s: [0.0] * len(getattr(spec, s)) for s in SETTINGS} for _ in range(num_layers)]
        self.baseline: float | None = None
        self.rng = random.Random(seed)

    def _probs(self, logits: list[float]) -> list[float]:
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        return [w / sum(weights) for w in weights]

    def sample(self) -> list[dict]:
        """Choice indices per layer and setting."""
        return [{s: self.rng.choices(range(len(layer[s])), weights=self._probs(layer[s]))[0]
                 for s in SETTINGS} for layer in self.logits]

    def layout(self, indices: list[dict]) -> list[dict]:
        return [{s: getattr(self.spec, s)[i[s]] for s in SETTINGS} for i in indices]

    def greedy(self) -> list[dict]:
        return [{s: max(range(len(layer[s])), key=layer[s].__getitem__) for s in SETTINGS}
                for layer in self.logits]

    def update(self, indices: list[dict], reward: float) -> float:
        """One REINFORCE step; returns the advantage used."""
        advantage = 0.0 if self.baseline is None else reward - self.baseline
        self.baseline = reward if self.baseline is None else 0.7 * self.baseline + 0.3 * reward
        for layer, chosen in zip(self.logits, indices):
            for s in SETTINGS:
                probs = self._probs(layer[s])
                for k in range(len(probs)):
                    layer[s][k] += self.spec.learning_rate * advantage * ((k == chosen[s]) - probs[k])
        return advantage


class FimLayoutSearcher(Searcher):
    """Ray Tune searcher: suggests ``{"model.fim.layers": layout}``, learns from each finished
    trial's bpb and training FLOPs (``flops_of(layout)``)."""

    def __init__(self, spec: LayoutSearchSpec, num_layers: int, default_indices: list[dict],
                 flops_of, seed: int, metric: str = "bpb"):
        super().__init__(metric=metric, mode="min")
        self.policy = LayoutPolicy(spec, num_layers, seed)
        self.flops_of, self.default_indices = flops_of, default_indices
        self.default_flops = flops_of(self.policy.layout(default_indices))
        self.pending: dict[str, list[dict]] = {}
        self.history: list[dict] = []

    def suggest(self, trial_id: str):
        indices = self.default_indices if not self.pending and not self.history else self.policy.sample()
        self.pending[trial_id] = indices
        return {"model.fim.layers": self.policy.layout(indices)}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        indices = self.pending.pop(trial_id, None)
        if indices is None or error or not result or self.metric not in result:
            return
        layout = self.policy.layout(indices)
        flops = self.flops_of(layout)
        reward = -result[self.metric] - self.policy.spec.flops_weight * math.log2(flops / self.default_flops)
        advantage = self.policy.update(indices, reward)
        self.history.append({"trial": trial_id, "layout": layout, "bpb": result[self.metric],
                             "flops_per_token": flops, "reward": reward, "advantage": advantage,
                             "default": indices == self.default_indices})

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump({"policy": self.policy.__dict__, "history": self.history}, f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.policy.__dict__.update(state["policy"])
        self.history = state["history"]


def confirm(spec, layouts: dict[str, list[dict]], out_dir, seeds: int) -> dict:
    """Retrain each named layout with ``seeds`` training seeds the search did not use (the
    search's seed + 1..N; same batches for every layout of a seed): one search trial per layout
    cannot tell a better layout from a lucky run."""
    from pathlib import Path

    from pretrain.core.metrics import read_metrics
    from pretrain.research import stats
    from pretrain.research.compare import train_run

    base_seed = trial_config(spec, {}, "unset").train.seed
    result = {"seeds": [base_seed + k for k in range(1, seeds + 1)], "layouts": {}}
    for name, layout in layouts.items():
        bpbs = []
        for seed in result["seeds"]:
            run_dir = Path(out_dir) / "confirm" / f"{name}-seed{seed}"
            cfg = trial_config(spec, {"model.fim.layers": layout, "train.seed": seed}, str(run_dir))
            cfg.train.checkpoint_every = 0
            print(f"--- confirming the {name} layout, seed {seed}", flush=True)
            train_run(cfg, run_dir)
            bpbs.append([r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "val"][-1]["bpb"])
        result["layouts"][name] = {"layout": layout, "bpb": stats.summarize(bpbs)}
    if {"chosen", "default"} <= set(result["layouts"]):
        result["welch"] = stats.welch(result["layouts"]["chosen"]["bpb"]["values"],
                                      result["layouts"]["default"]["bpb"]["values"])
    return result
