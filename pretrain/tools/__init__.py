"""Tools that use a trained model: export, generate, compress, inspect-attention."""
