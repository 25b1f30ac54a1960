"""The training core: run config, parallel set-up, DeepSpeed engine, steps, checkpoints, metrics.

Imports ``data_pipeline``, ``kernels`` and ``model`` only; tools, benchmarks and research build on
it (docs/ARCHITECTURE.md)."""
