"""Online hard-negative mixing (KaLM-Embedding-V2, arXiv 2506.20923; after MoCHi,
Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive Learning", arXiv 2010.01028).

For query i with hard negatives n_i1..n_in, K synthetic negatives are made as

    x_ik = normalise( λ_k · e(n_ia) + (1 - λ_k) · e(n_ib) ),   λ_k ~ Beta(2, 2),  a ≠ b drawn from 1..n

and added to query i's softmax denominator only (``info_nce(..., extra_negatives=x)``).
As in MoCHi the synthetic points are constants for the optimiser (detached): they make the
denominator harder without adding gradient paths through the mixing coefficients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mix_hard_negatives(
    negatives: torch.Tensor, k: int, generator: torch.Generator | None = None, alpha: float = 2.0, beta: float = 2.0
) -> torch.Tensor:
    """``negatives``: (B, n, d) embeddings of each query's own hard negatives -> (B, k, d)."""
    b, n, d = negatives.shape
    if k <= 0 or n < 2:
        return negatives.new_zeros((b, 0, d))
    # two distinct negatives per synthetic point: a uniform, b uniform among the other n - 1
    first = torch.randint(0, n, (b, k), generator=generator, device="cpu")
    second = (first + torch.randint(1, n, (b, k), generator=generator, device="cpu")) % n
    lam = _beta(alpha, beta, (b, k, 1), generator)
    neg = negatives.detach()
    idx = torch.arange(b)[:, None]
    first, second, lam = first.to(neg.device), second.to(neg.device), lam.to(neg.device, neg.dtype)
    mixed = lam * neg[idx, first] + (1 - lam) * neg[idx, second]
    return F.normalize(mixed, dim=-1)


def _beta(alpha: float, beta: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Beta(α, β) as X / (X + Y), X ~ Gamma(α), Y ~ Gamma(β): seedable (torch's Beta takes no generator)."""
    x, y = _gamma(alpha, shape, generator), _gamma(beta, shape, generator)
    return x / (x + y)


def _gamma(shape_param: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # For integer shape parameters (KaLM's Beta(2, 2)) a Gamma(m) variate is a sum of m Exp(1).
    if float(shape_param).is_integer():
        u = torch.rand((*shape, int(shape_param)), generator=generator)
        return -torch.log1p(-u).sum(-1)
    raise ValueError("seeded mixing supports integer Beta parameters (KaLM uses Beta(2, 2))")
