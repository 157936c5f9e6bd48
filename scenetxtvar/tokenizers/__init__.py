"""Image tokenizers: multi-scale VQ-VAE and related quantizers."""
