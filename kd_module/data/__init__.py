"""Data: tokenizers, prepared megatron datasets, the data module and the embedded corpus."""
