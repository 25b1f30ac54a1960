"""Fractal Mamba: byte-level Mamba blocks beside seeded fractal modules (model.fractal_mamba)."""
