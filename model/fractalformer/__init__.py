"""FractalFormer: nested self-similar sub-models trained jointly (model.fractalformer)."""
