"""Benchmarks (`python -m pretrain bench <what>`): measured numbers written to OUT/results.json."""
