"""Check shards against the manifest: presence, size and sha256."""
from __future__ import annotations

from pathlib import Path

from .shards import read_manifest, sha256_file


def verify(data_dir: str | Path) -> list[str]:
    """Return one line per missing, truncated or altered shard (empty when all is well)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    problems = []
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
