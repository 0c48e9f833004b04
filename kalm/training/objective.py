"""The training objective as configured: InfoNCE with focal weights, mixed hard negatives and
Matryoshka prefixes (the terms are kalm.losses'), the optimizer and the learning-rate schedule."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kalm.losses import (
    distill_kl,
    focal_weights,
    matryoshka,
    mix_hard_negatives,
    positive_log_probs,
)
from kalm.training.config import TrainConfig

log = logging.getLogger(__name__)


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    cfg: TrainConfig,
    negs_per_query: int = 0,
    generator: torch.Generator | None = None,
    terms: dict[str, float] | None = None,
    mask: torch.Tensor | None = None,
    distill: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """InfoNCE (+ focal weights, + mixed negatives, + distillation, + Matryoshka prefixes) as configured.

    ``p`` is laid out as the B positives, then ``negs_per_query`` negatives per query in query
    order (0 when the batch's queries do not all have the same number: no mixing then).
    Embeddings are L2-normalised here, whatever the model's last module: the temperature is
    meant for cosine similarities, and a start model without a ``Normalize`` module would
    otherwise train on raw dot products at τ = 0.01. ``mask``: columns left out of each row's
    denominator (``BatchTexts.column_mask``).

    ``distill``: (candidates, teacher scores) of ``BatchTexts.distill_targets``; with
    ``cfg.distill_weight`` > 0 each prefix's term adds w · mean_i f_i · KL_i (``kalm.losses.distill``),
    f_i the query's focal weight (detached: it weighs the query, as in its InfoNCE term) or 1.

    With ``terms`` given, it receives the values of this same forward pass: ``loss_infonce``
    (plain -log p_i mean at the full dimension, or the first Matryoshka one), ``loss_focal`` (its
    (1 - p_i)^γ-weighted value, when γ > 0), ``loss_distill`` (the mean KL_i, when distilling) and
    ``loss_dim{d}`` (each Matryoshka prefix's term, before its weight).
    """
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    b = q.shape[0]
    k = negs_per_query if cfg.mix_negatives < 0 else cfg.mix_negatives
    first: dict[str, torch.Tensor] = {}

    def nce(a, c):
        extra = None
        if k and negs_per_query >= 2:
            extra = mix_hard_negatives(c[b:].reshape(b, negs_per_query, -1), k, generator)
        log_p = positive_log_probs(a, c, cfg.temperature, extra_negatives=extra, mask=mask)
        value = -log_p.mean() if cfg.focal_gamma == 0.0 else (focal_weights(log_p, cfg.focal_gamma) * -log_p).mean()
        if not first:
            first.update(loss_infonce=-log_p.mean().detach(), loss_focal=value.detach())
        if distill is not None and cfg.distill_weight > 0:
            kl = distill_kl(a, c, distill[0], distill[1], cfg.distill_temperature)
            weight = focal_weights(log_p, cfg.focal_gamma).detach() if cfg.focal_gamma else 1.0
            value = value + cfg.distill_weight * (weight * kl).mean()
            first.setdefault("loss_distill", kl.mean().detach())
        return value

    per_dim: dict[int, torch.Tensor] = {}
    loss = (
        matryoshka(nce, q, p, cfg.matryoshka_dims, cfg.matryoshka_weights, per_dim)
        if cfg.matryoshka_dims
        else nce(q, p)
    )
    if terms is not None:
        terms["loss_infonce"] = first["loss_infonce"].item()
        if cfg.focal_gamma:
            terms["loss_focal"] = first["loss_focal"].item()
        if "loss_distill" in first:
            terms["loss_distill"] = first["loss_distill"].item()
        terms.update({f"loss_dim{d}": v.item() for d, v in per_dim.items()})
    return loss


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight matrices (and embeddings) decay; biases and norm weights (1-d tensors) never do, as
    in transformers' Trainer. KaLM's reference trains with weight decay 0 (the default)."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) where this torch build has it, as
    transformers' Trainer defaults to: on CPU the per-tensor loop costs about as much as a
    MiniLM forward pass of the whole batch (measured for scripts/bench_train.py)."""
    groups = param_groups(params, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / torch
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, (total - step) / max(1, total - warmup))
