"""Model families. Each reads like single-device PyTorch; parallelism comes from megatron-core.
``model.registry`` declares them (and registers the built-in ones on import)."""
import warnings

# megatron-core warns on import, about a dozen times a run, that Apex / Transformer Engine are not
# installed and it falls back to torch: optional GPU accelerations (requirements-gpu.txt), and the
# fallbacks are what runs here. Every path to megatron comes through this package first.
for _message in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                 ".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_message)

from .registry import ModelFamily, Supports, families, get_family, names, register  # noqa: E402, F401
