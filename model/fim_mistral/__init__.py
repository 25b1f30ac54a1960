"""FIM-Mistral: the baseline with FIM attention (kernels/fim_*.py) and per-layer FIM settings (model.fim)."""
