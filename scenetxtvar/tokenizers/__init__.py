"""Image tokenizers: Infinity's BSQ-VAE (bits) and VAR's multi-scale VQ-VAE (indices)."""

from .bsq import BSQVAE, BSQVAEConfig, load_bsq_vae
from .vq import VQVAE, load_vq_vae
from .vq_codes import IndexCodes

__all__ = ["BSQVAE", "BSQVAEConfig", "IndexCodes", "VQVAE", "load_bsq_vae", "load_vq_vae"]
