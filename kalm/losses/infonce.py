"""InfoNCE with in-batch and hard negatives, optional focal reweighting and per-query extras.

For queries q_1..q_B, their positives p_1..p_B and all hard negatives n_1..n_M of the
batch, with s the cosine similarity and τ the temperature:

    p_i = exp(s(q_i, p_i)/τ) / ( Σ_j exp(s(q_i, p_j)/τ) + Σ_m exp(s(q_i, n_m)/τ) + Σ_k exp(s(q_i, x_ik)/τ) )
    L   = 1/B Σ_i (1 - p_i)^γ · (-log p_i)

so every query competes against its own positive, the other queries' positives (in-batch
negatives), every hard negative in the batch and, optionally, extra negatives x_ik that only
its own denominator holds (the synthetic negatives of ``kalm.losses.mixing``).

- γ = 0 and no extras: plain InfoNCE, equal to sentence-transformers'
  ``MultipleNegativesRankingLoss`` with hard negatives and ``scale = 1/τ``.
- γ > 0: focal-style reweighting (KaLM-Embedding-V2, arXiv 2506.20923, after Lin et al. 2017,
  "Focal Loss", arXiv 1708.02002): examples the model already gets right (p_i → 1) weigh less.

``positive_log_probs`` returns the log p_i themselves, so a caller can report the plain and
the focal-weighted value of one forward pass (the trainer logs both).

References: van den Oord et al. 2018 (arXiv 1807.03748); Karpukhin et al. 2020 (DPR);
KaLM-Embedding (arXiv 2501.01028) uses τ = 0.01.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_log_probs(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float = 0.01,
    extra_negatives: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_i for every query (shape (B,)); the layout is that of :func:`info_nce`.

    ``mask`` (bool, (B, P)): columns left out of query i's denominator where True (false negatives,
    see ``kalm.losses.false_negatives``); its own positive (column i) must not be masked.
    """
    if passages.shape[0] < queries.shape[0]:
        raise ValueError("passages must start with one positive per query")
    logits = queries @ passages.T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        logits = torch.cat([logits, torch.einsum("bd,bkd->bk", queries, extra_negatives) / temperature], dim=1)
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


def focal_weights(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p_i)^γ, computed from log p_i."""
    # 1 - p via expm1 (exact near p = 1), floored: d/dp (1 - p)^γ is infinite at p = 1 for γ < 1,
    # which would turn an already-solved example into NaN gradients.
    return (-torch.expm1(log_p)).clamp_min(1e-6) ** gamma


def info_nce(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float = 0.01,
    focal_gamma: float = 0.0,
    extra_negatives: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``passages`` holds the B positives first (row i belongs to query i), then the negatives.

    ``extra_negatives`` has shape (B, K, d): K negatives for each query's denominator only.
    Embeddings are expected L2-normalised, so the dot product is the cosine similarity.
    """
    log_p = positive_log_probs(queries, passages, temperature, extra_negatives, mask)
    if focal_gamma == 0.0:
        return -log_p.mean()
    return (focal_weights(log_p, focal_gamma) * -log_p).mean()
