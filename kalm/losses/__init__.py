"""Contrastive losses, one module per idea (in the style of sentence-transformers' losses)."""

from kalm.losses.infonce import info_nce
from kalm.losses.matryoshka import matryoshka
from kalm.losses.mixing import mix_hard_negatives

__all__ = ["info_nce", "matryoshka", "mix_hard_negatives"]
