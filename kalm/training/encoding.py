"""Encoding a batch: precision (bf16 autocast), gradient checkpointing and GradCache chunks."""

from __future__ import annotations

import contextlib
import logging

import torch

from kalm.training.config import PRECISIONS

log = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast or none. ``auto``: bf16 on a CUDA device that supports it, else fp32.

    Weights, optimizer state and the loss stay fp32 (autocast runs the matmuls in bf16); bf16 has
    fp32's exponent range, so unlike fp16 no loss scaling is needed.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward instead of storing them (memory for time).

    Non-reentrant checkpointing restores the RNG state for the recomputation, so dropout masks
    (and hence gradients) are those of a plain run.
    """
    backbone = _hf_backbone(model)
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        backbone.activation_checkpointing_enable({"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_gradient_checkpointing(model) -> None:
    backbone = _hf_backbone(model)
    (getattr(backbone, "activation_checkpointing_disable", None) or backbone.gradient_checkpointing_disable)()


def _hf_backbone(model):
    from kalm.models.modeling import _backbone

    return _backbone(model)


def tokenize(model, texts: list[str]) -> dict:
    features = model.preprocess(texts)
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def encode(model, features: dict, amp: torch.dtype | None) -> torch.Tensor:
    """Sentence embeddings (fp32) of tokenized ``features``, with gradients if enabled."""
    ctx = torch.autocast(model.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        emb = model(features)["sentence_embedding"]
    return emb.float()  # the loss is computed in fp32: at τ = 0.01, bf16 rounding would move logits by ~0.4


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(
    model, queries: list[str], passages: list[str], loss_on, mini_batch_size: int = 0, amp: torch.dtype | None = None
) -> tuple[torch.Tensor, int]:
    """Encode this process's texts, compute ``loss_on(q_emb, p_emb)`` and backpropagate into the model.

    Returns the (detached) loss and the number of non-padding tokens encoded.

    With ``mini_batch_size`` m > 0: gradient caching (GradCache; Gao et al. 2021, "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup", arXiv 2101.06983). The contrastive
    loss couples every text of the batch, so the batch cannot simply be split into accumulation
    steps. Instead:

    1. encode the texts in chunks of m without a graph, saving the RNG state before each chunk;
    2. compute the loss on the full batch of embeddings and backpropagate to the embeddings only:
       g = ∂L/∂e (cheap: the model is not in this graph);
    3. re-encode each chunk with a graph, the RNG state restored (same dropout masks as in 1), and
       backpropagate g's rows of that chunk: Σ_chunks (∂e/∂θ)ᵀ g = ∂L/∂θ.

    Peak activation memory is that of one chunk, at the cost of one extra forward pass; the
    parameter gradients equal those of the whole batch at once (a test checks it).
    """
    device = model.device
    dim = model.get_embedding_dimension()
    empty = torch.zeros((0, dim), device=device)  # a torchrun rank can get no query of a small batch
    if not mini_batch_size:
        feats = [tokenize(model, t) if t else None for t in (queries, passages)]
        q, p = (encode(model, f, amp) if f else empty for f in feats)
        loss = loss_on(q, p)
        if loss.requires_grad:
            loss.backward()
        return loss.detach(), sum(int(f["attention_mask"].sum()) for f in feats if f)

    m = mini_batch_size
    chunks = [[tokenize(model, t[i : i + m]) for i in range(0, len(t), m)] for t in (queries, passages)]
    states, embs = [[], []], [[], []]
    with torch.no_grad():
        for side in (0, 1):
            for f in chunks[side]:
                states[side].append(_rng_state(device))
                embs[side].append(encode(model, f, amp))
    q, p = (torch.cat(e).requires_grad_() if e else empty.clone().requires_grad_() for e in embs)
    loss = loss_on(q, p)
    if loss.requires_grad:
        loss.backward()
    for side, leaf in ((0, q), (1, p)):
        if leaf.grad is None:
            continue
        for f, state, g in zip(chunks[side], states[side], leaf.grad.split(m)):
            _set_rng_state(state, device)
            encode(model, f, amp).backward(g)
    return loss.detach(), sum(int(f["attention_mask"].sum()) for side in chunks for f in side)
