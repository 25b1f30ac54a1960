"""Pretraining stack: CLI, trainer, DeepSpeed engine, parallel setup, checkpoints, metrics."""
