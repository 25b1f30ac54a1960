"""Fused kernels and custom ops, each with its torch reference.

Inductor's FX graph cache keys a compiled graph by its code, which names our custom ops but not
their fake (meta) kernels; a graph compiled before a fake kernel changed would come back from the
on-disk cache with the old output sizes baked into its checks. So the cache key is tagged with a
hash of this package's source: editing any kernel recompiles, an unchanged tree still hits.
"""
import hashlib
from pathlib import Path

import torch.compiler.config as _compiler_config


def _source_tag() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "fractal-kernels-" + digest.hexdigest()[:16]


SOURCE_TAG = _source_tag()  # also what `bench compare` checks before reusing an attention timing


def _tag_compile_cache() -> None:
    tag = SOURCE_TAG
    current = _compiler_config.cache_key_tag
    if tag not in current:
        _compiler_config.cache_key_tag = f"{current}+{tag}" if current else tag


_tag_compile_cache()
