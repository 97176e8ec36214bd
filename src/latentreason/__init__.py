"""latentreason: latent reasoning for Hugging Face causal LMs (Latent-SFT, DLR, refinement)."""

__version__ = "0.1.0"
