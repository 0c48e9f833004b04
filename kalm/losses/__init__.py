"""Contrastive losses, one module per idea (in the style of sentence-transformers' losses)."""

from kalm.losses.infonce import info_nce
from kalm.losses.matryoshka import matryoshka

__all__ = ["info_nce", "matryoshka"]
