"""BSFIN: entropy patches over bytes, complex-valued interference attention (model.bsfin)."""
