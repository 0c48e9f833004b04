"""InfoNCE with in-batch and hard negatives.

For queries q_1..q_B, their positives p_1..p_B and all hard negatives n_1..n_M of the
batch, with s the cosine similarity and τ the temperature:

    L = -1/B Σ_i log( exp(s(q_i, p_i)/τ) / ( Σ_j exp(s(q_i, p_j)/τ) + Σ_m exp(s(q_i, n_m)/τ) ) )

so every query competes against its own positive, the other queries' positives (in-batch
negatives) and every hard negative in the batch. This equals sentence-transformers'
``MultipleNegativesRankingLoss`` with hard negatives and ``scale = 1/τ``.
References: van den Oord et al. 2018 (arXiv 1807.03748); Karpukhin et al. 2020 (DPR);
KaLM-Embedding (arXiv 2501.01028) uses τ = 0.01.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """``passages`` holds the B positives first (row i belongs to query i), then the negatives.

    Embeddings are expected L2-normalised (the model ends in a Normalize module), so the dot
    product is the cosine similarity.
    """
    if passages.shape[0] < queries.shape[0]:
        raise ValueError("passages must start with one positive per query")
    logits = queries @ passages.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, labels)
