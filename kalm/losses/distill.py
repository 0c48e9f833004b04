"""Contrastive distillation: the student's ranking of each query's candidates pulled towards a teacher's.

For query q_i with candidates c_i1..c_iC (its positive and its hard negatives), teacher similarities t_ij
(cosine, scored offline by ``kalm teacher-score``) and student similarities s_ij = cos(q_i, c_ij):

    P_t(j | i) = softmax_j(t_ij / τ_d),    P_s(j | i) = softmax_j(s_ij / τ_d)
    KL_i = Σ_j P_t(j | i) · (log P_t(j | i) - log P_s(j | i))

and the stage's loss is L = L_CL + w · 1/B Σ_i KL_i (KaLM-Embedding-V2.5, arXiv 2506.20923 v3+: teacher
Qwen3-Embedding-8B, τ_d = 0.05 best; after Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network", arXiv 1503.02531, applied to retrieval lists as in RocketQAv2, arXiv 2110.07367). The trainer
applies focal weights and Matryoshka prefixes to this term as to InfoNCE (``kalm.training.objective``).

A candidate without a teacher score (NaN: a random pad added at training time) leaves both
distributions; a query with fewer than two scored candidates carries no ranking and gives KL 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(
    queries: torch.Tensor,
    passages: torch.Tensor,
    candidates: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """KL_i for every query (shape (B,)).

    ``queries`` (B, d) and ``passages`` (P, d) L2-normalised; ``candidates`` (B, C) int64 rows of
    ``passages`` (-1: none); ``teacher`` (B, C) the teacher's cosine similarities (NaN: none).
    """
    teacher = teacher.to(queries.device, torch.float32)
    candidates = candidates.to(queries.device)
    valid = (candidates >= 0) & torch.isfinite(teacher)
    student = torch.einsum("bd,bcd->bc", queries.float(), passages.float()[candidates.clamp_min(0)]) / temperature
    student = student.masked_fill(~valid, float("-inf"))
    target = (teacher / temperature).masked_fill(~valid, float("-inf"))
    log_ps = F.log_softmax(student, dim=-1)
    log_pt = F.log_softmax(target, dim=-1)
    terms = torch.where(valid, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_ps))
    return torch.where(valid.sum(-1) >= 2, terms.sum(-1), torch.zeros(len(terms), device=terms.device))
