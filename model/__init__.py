"""Model families. Each reads like single-device PyTorch; parallelism comes from megatron-core."""
from .registry import get_family, names  # noqa: F401
