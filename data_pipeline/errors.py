"""Errors of the data layer that several of its modules raise (here, so none imports another
only for its exception)."""
from __future__ import annotations


class ShardError(RuntimeError):
    """A shard or manifest is missing, truncated or altered; the message names it."""
