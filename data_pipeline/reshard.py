"""Re-split a loader's position over a new data-parallel size or worker count, exactly.

A loader reads through *slots* (data-parallel ranks x DataLoader workers); slot s of S reads
shards ``perm_e[s::S]`` of epoch e's permutation and saves where it is: the epoch, the shard and
document it has reached, the documents whose tokens it has begun to emit (``pending``, with an
``offset`` into them), and those waiting in its shuffle buffer. Index-based samplers re-split by
arithmetic; a streaming loader has to re-split that state. ``reshard`` does it:

- Every epoch some old slot has begun (up to the latest one, E) is finished under the old split:
  for each old slot, the rest of its current epoch and its whole share of the later epochs up to E
  become its *carry*, a list of ``[shard, first_document, stop_document | None]`` ranges, read
  before anything else. The new layout starts its own permutations at epoch E + 1.
- An old slot's in-flight work stays together: its partly emitted documents (resumed at the
  token they had reached), its shuffle buffer and its partly read shard go to new slot
  ``old % S_new``; its whole unread shards are dealt to the new slots with the fewest so far.

So after a change, no document is repeated and none is dropped: each is read exactly once in the
epochs already begun, and later epochs follow the new layout. Batches differ from an unchanged
run's (different slots pack them), and the DataLoader's round-robin restarts at an item boundary.
"""
from __future__ import annotations

import numpy as np


def fresh_slot_state() -> dict:
    # ``pending`` references the documents whose tokens are not fully emitted yet, as
    # (shard, index) or (shard, index, tokens already emitted before a reshard), and ``offset`` is
    # how far into them (EOS included) emission has got: a few integers stand for the leftover
    # tokens, so the state crossing the worker boundary with every batch is tiny. ``carry``:
    # ranges read before the epoch's own shards (after a reshard).
    return {"epoch": 0, "shard_pos": 0, "doc_pos": 0, "pending": [], "offset": 0,
            "shuffle_refs": [], "rng": None, "skipped": [], "carry": []}


class ReshardError(ValueError):
    """The saved states cannot be re-split; the message names what is missing or differs."""


def slot_shards(shards: list[str], seed: int, epoch: int, slot: int, num_slots: int,
                stored_order: bool) -> list[str]:
    """The shards slot ``slot`` of ``num_slots`` reads in ``epoch``."""
    if stored_order:  # evaluation: stored order
        order = shards
    else:
        order = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    return order[slot::num_slots]


def _old_slots(saved: list[dict]) -> tuple[dict, list[dict | None]]:
    """One state per old slot, from the state_dict() of every old rank (peers' copies allowed)."""
    by_rank: dict[int, dict] = {}
    for state in saved:
        rank = state["layout"].get("rank")
        if rank is None:
            raise ReshardError("the data loader state predates resharding (no rank recorded): resume "
                               "with the checkpoint's data-parallel size and data.num_workers")
        by_rank.setdefault(rank, state)
    layout = saved[0]["layout"]
    missing = sorted(set(range(layout["world_size"])) - set(by_rank))
    if missing:
        raise ReshardError(f"data loader states of data-parallel ranks {missing} are missing from the "
                           "checkpoint")
    workers = max(layout["num_workers"], 1)
    slots: list[dict | None] = []
    for rank in range(layout["world_size"]):
        slots += list(by_rank[rank]["slots"]) + [None] * (workers - len(by_rank[rank]["slots"]))
    return layout, slots


def reshard(saved: list[dict], spec: dict) -> list[dict]:
    """Fresh slot states for ``spec``'s ``num_slots`` slots that continue ``saved`` (the loader
    states of all old ranks) with every begun epoch's documents read exactly once."""
    layout, old = _old_slots(saved)
    if layout["seed"] != spec["seed"]:
        raise ReshardError(f"data loader state was saved with seed={layout['seed']}, this run has "
                           f"seed={spec['seed']}: a resumed run keeps train.seed")
    states = [s if s is not None else fresh_slot_state() for s in old]
    stored_order = spec["epochs"] == 1 and not layout["shuffle_buffer"]
    last_epoch = max(s["epoch"] for s in states)
    if spec["epochs"] is not None:
        last_epoch = min(last_epoch, spec["epochs"] - 1)
    n_new = spec["num_slots"]
    new = [dict(fresh_slot_state(), epoch=last_epoch + 1) for _ in range(n_new)]
    whole: list[list] = []  # unread shards, dealt out below
    for o, st in enumerate(states):
        target = new[o % n_new]
        target["skipped"] = target["skipped"] + list(st["skipped"])
        # documents begun: the first resumes at the token emission had reached
        for j, ref in enumerate(st["pending"]):
            skip = (ref[2] if len(ref) > 2 else 0) + (st["offset"] if j == 0 else 0)
            target["pending"] = target["pending"] + [(ref[0], ref[1], skip)]
        in_flight = [[shard, index, index + 1] for shard, index in st["shuffle_refs"]]
        carry = list(st.get("carry") or [])
        doc_pos = st["doc_pos"]
        if carry:
            shard, first, stop = carry[0]
            in_flight.append([shard, max(first, doc_pos), stop])
            whole += [item for item in carry[1:] if item[1] == 0 and item[2] is None]
            in_flight += [item for item in carry[1:] if item[1] != 0 or item[2] is not None]
            doc_pos = 0
        for epoch in range(st["epoch"], last_epoch + 1):
            shards = slot_shards(spec["shards"], spec["seed"], epoch, o, len(old), stored_order)
            start = st["shard_pos"] if epoch == st["epoch"] else 0
            for j, shard in enumerate(shards[start:]):
                if epoch == st["epoch"] and j == 0 and doc_pos > 0:
                    in_flight.append([shard, doc_pos, None])
                else:
                    whole.append([shard, 0, None])
        target["carry"] = target["carry"] + in_flight
    counts = [0] * n_new
    for item in whole:
        k = counts.index(min(counts))
        new[k]["carry"] = new[k]["carry"] + [item]
        counts[k] += 1
    return new
