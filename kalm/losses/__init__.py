"""Contrastive losses, one module per idea (in the style of sentence-transformers' losses)."""

from kalm.losses.distill import distill_kl
from kalm.losses.false_negatives import ColumnMask, false_negative_mask
from kalm.losses.infonce import focal_weights, info_nce, positive_log_probs
from kalm.losses.matryoshka import matryoshka
from kalm.losses.mixing import mix_hard_negatives

__all__ = [
    "ColumnMask",
    "distill_kl",
    "false_negative_mask",
    "focal_weights",
    "info_nce",
    "matryoshka",
    "mix_hard_negatives",
    "positive_log_probs",
]
