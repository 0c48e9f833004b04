"""Matryoshka representation learning: the loss summed over embedding prefixes.

    L_MRL = Σ_d w_d · L(q[:, :d] / ||q[:, :d]||, p[:, :d] / ||p[:, :d]||)

so the first d dimensions of an embedding are usable on their own. Kusupati et al. 2022,
"Matryoshka Representation Learning" (arXiv 2205.13147); KaLM-Embedding-V2 uses dims
896/512/256/128/64 with weights 1/0.3/0.2/0.1/0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def matryoshka(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    queries: torch.Tensor,
    passages: torch.Tensor,
    dims: Sequence[int],
    weights: Sequence[float],
    terms: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The weighted sum; with ``terms`` given, each prefix's unweighted L is stored there by dim."""
    if len(dims) != len(weights):
        raise ValueError("matryoshka dims and weights must have the same length")
    full = queries.shape[-1]
    if any(d > full or d < 1 for d in dims):
        raise ValueError(f"matryoshka dims {list(dims)} must lie in 1..{full}")
    total = 0.0
    for d, w in zip(dims, weights):
        value = loss_fn(F.normalize(queries[:, :d], dim=-1), F.normalize(passages[:, :d], dim=-1))
        if terms is not None:
            terms[d] = value.detach()
        total = total + w * value
    return total
