"""Check shards against the manifest: presence, size and sha256, for a local or remote dataset."""
from __future__ import annotations

from pathlib import Path

from .shards import ShardError, read_manifest, sha256_file
from .storage import DataStore, is_url


def verify(data_dir: str | Path) -> list[str]:
    """Return one line per missing, truncated or altered shard (empty when all is well)."""
    manifest = read_manifest(data_dir)
    problems = []
    if is_url(data_dir):
        store = DataStore(data_dir)
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                try:
                    store.shard_bytes(shard["name"], shard["size"], shard["sha256"])
                except ShardError as exc:
                    problems.append(str(exc).split(";")[0].removeprefix("shard "))
        return problems
    data_dir = Path(data_dir)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = data_dir / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["size"]:
                problems.append(f"{path}: size {path.stat().st_size} != {shard['size']} in manifest "
                                f"({'truncated' if path.stat().st_size < shard['size'] else 'altered'})")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from manifest (altered)")
    return problems
