"""Contrastive losses, one module per idea (in the style of sentence-transformers' losses)."""

from kalm.losses.infonce import info_nce

__all__ = ["info_nce"]
