"""The Mistral baseline (megatron-core GPTModel with our kernels); registry entry in model/registry.py."""
