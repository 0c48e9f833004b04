"""Contrastive training: one direct loop for both stages (in the spirit of nanoGPT).

- ``pretrain``: weak pairs, in-batch negatives only.
- ``finetune``: mined hard negatives, ``group_size`` = 1 positive + (group_size - 1) negatives.

One step, top to bottom (``train``):

1. the batch of global step t is a pure function of (seed, t) (``BatchSchedule``): task-homogeneous
   (KaLM), or semi-homogeneous with ``homogeneous_ratio`` < 1. Batches are rows of a small index (per
   record its row and task code); the texts stay on disk, memory-mapped (``kalm.train_data``: the
   Parquet parts or JSON Lines through an Arrow cache), and a step reads only its batch's records;
2. its texts (``batch_texts``): queries carry their task instruction, symmetric tasks (STS-like) carry
   it on both sides; a record short of hard negatives is dropped, padded with random passages of its
   task, or kept ragged (``few_negatives``), and counted;
3. with torchrun (WORLD_SIZE > 1) each rank encodes its slice of the global batch; embeddings are
   all-gathered so every query sees every rank's passages (cross-device negatives);
4. encoding runs under bf16 autocast (``precision``), with gradient checkpointing if asked, and in
   GradCache chunks of ``mini_batch_size`` texts (``forward_backward``);
5. the loss (``contrastive_loss``: InfoNCE + focal + mixed negatives + Matryoshka) and its terms go to
   the metrics JSON Lines file, one line per step; counts go to a stats JSON at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kalm.instructions import format_passage, format_query
from kalm.io import StageStats, atomic_path, write_jsonl
from kalm.losses import (
    ColumnMask,
    false_negative_mask,
    focal_weights,
    matryoshka,
    mix_hard_negatives,
    positive_log_probs,
)
from kalm.modeling import add_pooling_argument
from kalm.train_data import FEW_NEGATIVES, convert_parts, data_parts, open_data, parts_fingerprint, remove_cache

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    stage: str = "finetune"
    batch_size: int = 32  # the GLOBAL batch: with torchrun each rank encodes its slice of it
    group_size: int = 8
    lr: float = 1e-5
    temperature: float = 0.01
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW decay of weight matrices; norms and biases never decay
    max_grad_norm: float = 1.0
    seed: int = 0
    max_seq_length: int | None = None
    threads: int | None = None
    focal_gamma: float = 0.0
    mix_negatives: int = 0  # synthetic negatives per query; -1 = as many as its mined negatives
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    homogeneous_ratio: float = 1.0  # share of a batch's slots from its own task (1.0: task-homogeneous)
    few_negatives: str = "pad_random"  # drop | pad_random | keep, for records short of group_size - 1 negatives
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on a CUDA device that supports it)
    gradient_checkpointing: bool = False
    mini_batch_size: int = 0  # GradCache chunk (texts per forward); 0 = the whole batch at once
    pooling: str = "mean"  # for a plain HF backbone (a sentence-transformers start model keeps its own)
    save_dtype: str = "float32"  # dtype of the saved model: float32 | bfloat16 (training is always fp32)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def task_homogeneous_batches(
    rows: Sequence[int] | np.ndarray,
    tasks: Sequence[int] | np.ndarray,
    batch_size: int,
    rng: random.Random,
    homogeneous_ratio: float = 1.0,
) -> list[np.ndarray]:
    """Batches of ``rows`` (``tasks[i]``: the task code of ``rows[i]``, codes in sorted task-name order).

    Shuffle within each task, cut into full batches, pool every task's leftover tail into
    mixed full batches, shuffle the batch order; then, when ``homogeneous_ratio`` < 1, make them
    semi-homogeneous (``_mix_tails``).

    Pooling the tails (as the reference sampler, KaLM's ``DistributedInTaskSampler``, does) keeps
    every step at the full batch size: a task's tail as its own batch would be a step of as few as
    2 queries at the full learning rate. Of the pooled tails' last partial batch (fewer than
    ``batch_size`` records: one per epoch at most) a batch is made when it has two records or
    more; a single record left over is the only one not used that epoch
    (:func:`records_left_out_per_epoch` counts it).

    Rows are numpy arrays shuffled by ``random.Random.shuffle``, which permutes any sequence as
    it permutes a list: the batches are those the former list-of-dicts batcher made of the same
    records in the same order (tests/test_train_data.py keeps it as a reference).
    """
    rows, tasks = np.asarray(rows), np.asarray(tasks)
    if len(rows) != len(tasks):
        raise ValueError(f"{len(rows)} rows but {len(tasks)} task codes")
    grouped = rows[np.argsort(tasks, kind="stable")]  # each task's rows, in row order, tasks in code order
    bounds = np.cumsum(np.bincount(tasks)) if len(tasks) else np.zeros(0, np.int64)
    batches, tails = [], []
    for recs in np.split(grouped, bounds[:-1]):
        rng.shuffle(recs)  # a view of ``grouped``: shuffled in place
        full = len(recs) - len(recs) % batch_size
        batches += [recs[i : i + batch_size] for i in range(0, full, batch_size)]
        tails.append(recs[full:])
    pooled = np.concatenate(tails) if tails else grouped
    rng.shuffle(pooled)
    batches += [b for i in range(0, len(pooled), batch_size) if len(b := pooled[i : i + batch_size]) >= 2]
    rng.shuffle(batches)
    if homogeneous_ratio < 1.0:
        _mix_tails(batches, homogeneous_ratio, rng)
    return batches


def records_left_out_per_epoch(task_sizes: Mapping[str, int] | Sequence[int], batch_size: int) -> int:
    """Records of an epoch in no batch (:func:`task_homogeneous_batches`): 1 when the pooled tails
    leave a single record over, else 0."""
    sizes = task_sizes.values() if isinstance(task_sizes, Mapping) else task_sizes
    return int(sum(int(n) % batch_size for n in sizes) % batch_size == 1)


def _mix_tails(batches: list[np.ndarray], ratio: float, rng: random.Random) -> None:
    """Semi-homogeneous task batches (KaLM-Embedding, arXiv 2501.01028).

    Each batch of n records keeps its first ``own = ⌊ratio·n + ½⌋`` (its own task); the other
    n - own records of all batches are pooled, shuffled and dealt back. Fully homogeneous
    batches give the hardest in-batch negatives but let the model learn task-specific shortcuts
    and concentrate false negatives; a few slots from other tasks trade a little of the first
    for less of the second. Drawing the foreign slots from one shuffled pool (as the reference
    sampler ``DistributedInTaskSampler._shuffle_last_elements`` does) keeps every record used
    exactly once per epoch; the pool holds the tails of every task, so the slots come mostly
    from other tasks (and only from other tasks' share of the data).
    """
    if not batches:
        return
    own = [math.floor(ratio * len(b) + 0.5) for b in batches]
    pool = np.concatenate([b[k:] for b, k in zip(batches, own)])
    rng.shuffle(pool)
    start = 0
    for i, (b, k) in enumerate(zip(batches, own)):
        take = len(b) - k
        batches[i] = np.concatenate([b[:k], pool[start : start + take]])
        start += take


class BatchSchedule:
    """The batch (global rows) of every global step: a pure function of (seed, step), so resume is exact.

    ``rows``/``tasks``: the training records' global rows and task codes (``TrainData``).
    Epoch e's batches come from ``random.Random(f"{seed}:epoch:{e}")``; the current epoch's list is
    cached, since rebuilding it (a shuffle of every record) at every step costs O(records).
    """

    def __init__(self, rows: np.ndarray, tasks: np.ndarray, cfg: TrainConfig):
        self.rows, self.tasks, self.cfg = rows, tasks, cfg
        self._epoch, self._batches = -1, []
        self.steps_per_epoch = len(self._epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError("fewer than two records: no batch with an in-batch negative can be made")
        self.left_out_per_epoch = records_left_out_per_epoch(np.bincount(np.asarray(tasks)).tolist(), cfg.batch_size)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            rng = random.Random(f"{self.cfg.seed}:epoch:{epoch}")
            self._batches = task_homogeneous_batches(
                self.rows, self.tasks, self.cfg.batch_size, rng, self.cfg.homogeneous_ratio
            )
            self._epoch = epoch
        return self._batches

    def __call__(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        return self._epoch_batches(epoch)[position]


# --------------------------------------------------------------------------------------------
# Texts and negatives
# --------------------------------------------------------------------------------------------


@dataclass
class BatchTexts:
    queries: list[str]
    positives: list[str]  # one per query
    negatives: list[list[str]]  # each query's hard negatives
    in_batch: list[bool] = field(default_factory=list)  # per query: False = its own negatives only
    padded: int = 0  # random negatives added to records short of negatives
    short: int = 0  # records still short (ragged) after that

    def passages(self, lo: int = 0, hi: int | None = None) -> list[str]:
        """Positives of queries lo..hi, then their negatives in query order (``info_nce``'s layout)."""
        return self.positives[lo:hi] + [n for negs in self.negatives[lo:hi] for n in negs]

    def negs_per_query(self) -> int:
        """The common number of negatives per query, or 0 when they differ (ragged batch)."""
        counts = {len(n) for n in self.negatives}
        return counts.pop() if len(counts) == 1 else 0

    def column_mask(self) -> ColumnMask:
        """Which passages leave each query's denominator (``kalm.losses.false_negatives``)."""
        starts = [len(self.positives)]
        for negs in self.negatives:
            starts.append(starts[-1] + len(negs))
        own = [range(a, b) for a, b in zip(starts, starts[1:])]
        return false_negative_mask(self.queries, self.passages(), own, self.in_batch)


PadFn = Callable[[str, int, set[str], random.Random], list[str]]  # (task, k, exclude, rng) -> passages


def batch_texts(
    batch: list[dict],
    n_neg: int,
    symmetric: dict[str, bool],
    rng: random.Random,
    pad: PadFn | None = None,
    in_batch: dict[str, bool] | None = None,
) -> BatchTexts:
    """Query texts, one positive per query, and ``n_neg`` hard negatives per query.

    ``in_batch``: {task: False} for tasks whose queries see only their own hard negatives (the
    task's ``in_batch_negatives: false``); default True.

    A record with fewer than ``n_neg`` negatives contributes the ones it has, plus, with ``pad``
    (``few_negatives: pad_random``: ``TrainData.random_passages``), random passages of its task,
    none of its own positives or negatives; if the task has too few distinct ones, they are
    repeated (as KaLM's reference data loader repeats negatives).
    """
    out = BatchTexts([], [], [])
    for rec in batch:
        instr, sym = rec.get("instruction"), symmetric.get(rec["task"], False)
        out.in_batch.append((in_batch or {}).get(rec["task"], True))
        out.queries.append(format_query(rec["query"], instr))
        out.positives.append(format_passage(rng.choice(rec["pos"]), instr, sym))
        negs = rec.get("neg", [])
        if len(negs) >= n_neg:
            chosen = rng.sample(negs, n_neg)
        else:
            chosen = list(negs)
            if pad is not None:
                chosen += pad(rec["task"], n_neg - len(chosen), set(rec["pos"]) | set(negs), rng)
                while chosen and len(chosen) < n_neg:
                    chosen.append(rng.choice(chosen))
                out.padded += len(chosen) - len(negs)
            out.short += len(chosen) < n_neg
        out.negatives.append([format_passage(n, instr, sym) for n in chosen])
    return out


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    cfg: TrainConfig,
    negs_per_query: int = 0,
    generator: torch.Generator | None = None,
    terms: dict[str, float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE (+ focal weights, + mixed negatives, + Matryoshka prefixes) as configured.

    ``p`` is laid out as the B positives, then ``negs_per_query`` negatives per query in query
    order (0 when the batch's queries do not all have the same number: no mixing then).
    Embeddings are L2-normalised here, whatever the model's last module: the temperature is
    meant for cosine similarities, and a start model without a ``Normalize`` module would
    otherwise train on raw dot products at τ = 0.01. ``mask``: columns left out of each row's
    denominator (``BatchTexts.column_mask``).

    With ``terms`` given, it receives the values of this same forward pass: ``loss_infonce``
    (plain -log p_i mean at the full dimension, or the first Matryoshka one), ``loss_focal`` (its
    (1 - p_i)^γ-weighted value, when γ > 0) and ``loss_dim{d}`` (each Matryoshka prefix's term,
    before its weight).
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


# --------------------------------------------------------------------------------------------
# Encoding: precision, gradient checkpointing, GradCache
# --------------------------------------------------------------------------------------------


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
    from kalm.modeling import _backbone

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


# --------------------------------------------------------------------------------------------
# Several processes (torchrun)
# --------------------------------------------------------------------------------------------


def rank_slices(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous slices of n records over ``world`` ranks, sizes differing by at most one."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + k) for s, k in zip(starts, sizes)]


@dataclass
class Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process (world 1).

    Data parallel with cross-device negatives, written out rather than wrapped in
    ``DistributedDataParallel``: every rank computes the loss of the WHOLE global batch from the
    all-gathered embeddings, in which only its own rows carry a graph. Its parameter gradient is
    then the part of the full-batch gradient that flows through its own texts, and the SUM over
    ranks is the full-batch gradient (DDP would average; with GradCache it would also all-reduce
    after each of the several backward passes of a step).
    """

    world: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device | None:
        """This rank's GPU (LOCAL_RANK) under torchrun; None (sentence-transformers' choice) otherwise."""
        if not self.enabled:
            return None
        if torch.cuda.is_available():
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def start(self, device: torch.device | None) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self._device = device

    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All ranks' rows, rank after rank (rank r has ``sizes[r]``); this rank's rows keep their graph."""
        if not self.enabled or max(sizes) == 0:
            return x
        import torch.distributed as dist

        buf = x.detach().new_zeros((max(sizes), x.shape[1]))  # all_gather needs equal shapes
        buf[: x.shape[0]] = x.detach()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        parts[self.rank] = x
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks (see the class docstring for why a sum)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        # A parameter no rank touched (e.g. BERT's unused pooler) keeps grad None, as in one process,
        # so AdamW skips it there too; one a rank did not touch (no query in its slice) counts as 0.
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self._device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        pending = []
        for p, h in zip(params, has.tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                pending.append(dist.all_reduce(p.grad, async_op=True))
        for work in pending:
            work.wait()

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class Checkpoint:
    """Resumable training state, kept OUTSIDE the rule's declared output.

    Snakemake deletes a rule's outputs (``directory()`` included) before re-running it, so the
    checkpoint lives in its own folder. It holds the weights, optimizer state, step and the
    metrics so far; everything random is derived from (seed, step). A checkpoint whose
    fingerprint (start model, data, hyper-parameters) differs is ignored, never mixed in.
    """

    def __init__(self, folder: str | None, fingerprint: dict):
        self.path = Path(folder) / "checkpoint.pt" if folder else None
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if not self.path or not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring checkpoint %s: it was made for another run configuration", self.path)
            return None
        return state

    def save(self, model, optimizer, step: int, metrics: list[dict], padded: int) -> None:
        if not self.path:
            return
        with atomic_path(self.path) as tmp:
            torch.save(
                {
                    "fingerprint": self.fingerprint,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "metrics": metrics,
                    "padded": padded,
                },
                tmp,
            )

    def remove(self) -> None:
        if self.path:
            self.path.unlink(missing_ok=True)


def _fingerprint(model_spec: str, parts: list[Path], cfg: TrainConfig) -> dict:
    """What a checkpoint was made for: start model, every data part (path, size, mtime), config."""
    return {
        "model": model_spec,
        "data": parts_fingerprint(parts),
        "config": {k: v for k, v in asdict(cfg).items() if k != "threads"},
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def fp32_master_weights(model) -> torch.dtype | None:
    """Cast the model's floating-point weights to fp32 when the checkpoint stored another dtype.

    transformers loads a checkpoint in the dtype its config names (Qwen2-0.5B: bfloat16). AdamW on
    bf16 weights loses most updates: an update of lr 1e-5 on a weight of 0.02 is below half a bf16
    ulp (2^-8 relative), so it rounds to nothing. Training keeps fp32 master weights and optimizer
    state; bf16 enters only through autocast (``precision``). Returns the dtype found, if not fp32.
    """
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if dtypes <= {torch.float32}:
        return None
    model.float()
    found = sorted(dtypes - {torch.float32}, key=str)[0]
    log.info("checkpoint weights are %s: training on fp32 master weights", str(found).replace("torch.", ""))
    return found


def train(
    model_spec: str,
    data_path: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str,
    cfg: TrainConfig,
    symmetric: dict[str, bool],
    metrics_path: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    stop_after_steps: int | None = None,
    stats_path: str | None = None,
    keep_snapshots: int = 0,
    snapshot_every: int = 0,
    in_batch: dict[str, bool] | None = None,
    data_cache: str | None = None,
) -> dict:
    """Train and save a sentence-transformers model to ``out_dir``.

    ``data_path``: Parquet parts (``kalm.shards``) or JSON Lines files, or folders of them, read
    in that order through an Arrow cache (``kalm.train_data``): ``data_cache`` if given (kept),
    else ``<checkpoint_dir>/arrow`` (removed with the checkpoint at the end), else a temporary folder.

    With ``checkpoint_dir``, state is saved every ``checkpoint_every`` steps and a re-run after a
    kill resumes from it, ending (on CPU) with the same weights as an uninterrupted run.
    ``stop_after_steps`` simulates a kill (tests): the process exits abruptly after that step.
    With ``keep_snapshots`` K and ``snapshot_every`` N, the model is also saved every N steps into
    ``<checkpoint_dir>/snapshots`` (the last K kept): the soup's last-k ingredients.
    ``in_batch``: {task: False} for tasks trained without in-batch negatives.
    Under torchrun only rank 0 writes (model, metrics, stats, checkpoints).
    """
    from kalm.modeling import load_embedding_model, save_model
    from kalm.soup import SnapshotKeeper, snapshot_dir

    if cfg.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if keep_snapshots > 0 and (not checkpoint_dir or snapshot_every <= 0):
        raise ValueError("keeping snapshots for the soup needs a checkpoint folder and snapshot_every > 0")

    parts = data_parts(data_path)
    ddp = Distributed()
    if ddp.rank:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ddp.device()
    ddp.start(device)
    scratch = None if data_cache or checkpoint_dir else tempfile.TemporaryDirectory(prefix="kalm-train-arrow-")
    try:
        model = load_embedding_model(
            model_spec, max_seq_length=cfg.max_seq_length, device=device and str(device), pooling=cfg.pooling
        )
        device = model.device
        loaded_dtype = fp32_master_weights(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        amp = autocast_dtype(cfg.precision, device)
        n_neg = 0 if cfg.stage == "pretrain" else cfg.group_size - 1
        stats = StageStats(f"train_{cfg.stage}")
        # The texts stay on disk, memory-mapped: one process per node converts the parts to the
        # Arrow cache (a shared cache folder), the others wait; in RAM only the index (row, task).
        cache = Path(data_cache or (Path(checkpoint_dir) / "arrow" if checkpoint_dir else scratch.name))
        if scratch is not None or ddp.local_rank == 0:
            convert_parts(parts, cache)
        ddp.barrier()
        data = open_data(parts, cache, convert=False)
        n_short = data.apply_few_negatives(n_neg, cfg.few_negatives, stats)
        pad = data.random_passages if cfg.few_negatives == "pad_random" and n_short else None
        if not len(data):
            raise ValueError(f"{', '.join(map(str, parts))}: no training records")
        if n_neg == 0 and in_batch and not all(in_batch.values()):
            raise ValueError(
                f"{cfg.stage}: in_batch_negatives false for {sorted(t for t, v in in_batch.items() if not v)} "
                "leaves those queries no negative (this stage has no hard negatives)"
            )
        schedule = BatchSchedule(data.rows, data.tasks, cfg)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * schedule.steps_per_epoch))
        warmup = int(cfg.warmup_ratio * total)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        checkpoint = Checkpoint(checkpoint_dir, _fingerprint(model_spec, parts, cfg))
        step, metrics, padded_total = 0, [], 0
        if (state := checkpoint.load()) is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, metrics, padded_total = state["step"], state["metrics"], state.get("padded", 0)
            log.info("resuming %s from step %d (%s)", cfg.stage, step, checkpoint.path)
        first_step = step
        keeper = None
        if ddp.rank == 0 and keep_snapshots > 0:
            keeper = SnapshotKeeper(
                snapshot_dir(checkpoint_dir), keep=keep_snapshots, fingerprint=_fingerprint(model_spec, parts, cfg)
            )
        log.info(
            "%s: %d records in %d part(s), index %.1f bytes per record, %d steps (%d per epoch), batch %d over "
            "%d process(es), group %d, %s, homogeneous ratio %.2f, mini-batch %s, checkpointing %s",
            cfg.stage,
            len(data),
            len(parts),
            data.index_nbytes / len(data),
            total,
            schedule.steps_per_epoch,
            cfg.batch_size,
            ddp.world,
            n_neg + 1,
            amp or torch.float32,
            cfg.homogeneous_ratio,
            cfg.mini_batch_size or "-",
            cfg.gradient_checkpointing,
        )
        t_start, cpu_start = time.time(), time.process_time()
        while step < total:
            t0 = time.time()
            # dropout masks: a function of (step, rank); seed * 1_000_003 + step in one process, as before
            torch.manual_seed((cfg.seed * 1_000_003 + step) * ddp.world + ddp.rank)
            sample_rng = random.Random(f"{cfg.seed}:step:{step}")
            mix_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = data.records(schedule(step))  # the global batch's records, read from the memory map
            lr = lr_at(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every rank builds the texts of the whole global batch (same RNG: same texts as one
            # process) and encodes its own slice of queries, with their positives and negatives.
            texts = batch_texts(batch, n_neg, symmetric, sample_rng, pad, in_batch)
            masked = texts.column_mask()  # the same on every rank: built from the global batch's texts
            slices = rank_slices(len(batch), ddp.world)
            lo, hi = slices[ddp.rank]
            q_sizes = [b - a for a, b in slices]
            neg_sizes = [sum(len(n) for n in texts.negatives[a:b]) for a, b in slices]
            per_query = texts.negs_per_query()
            terms: dict[str, float] = {}

            def loss_on(q_local, p_local):
                q = ddp.gather_rows(q_local, q_sizes)
                p = torch.cat(
                    [ddp.gather_rows(p_local[: hi - lo], q_sizes), ddp.gather_rows(p_local[hi - lo :], neg_sizes)]
                )
                return contrastive_loss(q, p, cfg, per_query, mix_gen, terms, masked.mask)

            optimizer.zero_grad(set_to_none=True)
            loss, tokens = forward_backward(
                model, texts.queries[lo:hi], texts.passages(lo, hi), loss_on, cfg.mini_batch_size, amp
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{cfg.stage}: loss is {loss.item()} at step {step + 1} (task {batch[0]['task']})"
                )
            ddp.all_reduce_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # before clipping
            optimizer.step()
            tokens = ddp.sum(tokens)
            step += 1
            padded_total += texts.padded
            dt = time.time() - t0
            metrics.append(
                {
                    "step": step,
                    "stage": cfg.stage,
                    "task": batch[0]["task"],
                    "loss": round(loss.item(), 6),
                    **{k: round(v, 6) for k, v in terms.items()},
                    "grad_norm": round(grad_norm.item(), 6),
                    "lr": lr,
                    "batch": len(batch),
                    "passages": len(texts.positives) + sum(map(len, texts.negatives)),
                    "padded_negatives": texts.padded,
                    "short_records": texts.short,
                    "false_negatives_masked": masked.false_negatives,
                    "duplicates_masked": masked.duplicates,
                    "tokens": int(tokens),
                    "samples_per_s": round(len(batch) / dt, 3),
                    "tokens_per_s": round(tokens / dt, 1),
                    "elapsed_s": round(time.time() - t_start, 3),
                }
            )
            if step == 1 or step % 10 == 0 or step == total:
                log.info("step %d/%d loss %.4f lr %.2e (%s)", step, total, metrics[-1]["loss"], lr, batch[0]["task"])
            if keeper is not None and step % snapshot_every == 0 and step < total:
                keeper.save(model, step)
            if ddp.rank == 0 and checkpoint_every and step % checkpoint_every == 0 and step < total:
                checkpoint.save(model, optimizer, step, metrics, padded_total)
            if stop_after_steps is not None and step >= stop_after_steps:
                log.warning("stopping abruptly after step %d (simulated kill)", step)
                os._exit(137)
        seconds, cpu_seconds = time.time() - t_start, time.process_time() - cpu_start
        if ddp.rank == 0:
            model.eval()
            if cfg.gradient_checkpointing:
                disable_gradient_checkpointing(model)
            save_model(model.to(SAVE_DTYPES[cfg.save_dtype]), out_dir)
            if keeper is not None:
                keeper.finish(out_dir, final_step=total)
            write_jsonl(metrics_path or f"{out_dir}.metrics.jsonl", metrics)
            stats.extra.update(
                negatives_padded_random=padded_total,
                steps=total,
                world_size=ddp.world,
                records_left_out_per_epoch=schedule.left_out_per_epoch,
                loaded_dtype=str(loaded_dtype or torch.float32).replace("torch.", ""),
                save_dtype=cfg.save_dtype,
                false_negatives_masked=sum(m["false_negatives_masked"] for m in metrics),
                precision=str(amp or torch.float32).replace("torch.", ""),
                gradient_checkpointing=cfg.gradient_checkpointing,
                mini_batch_size=cfg.mini_batch_size,
                homogeneous_ratio=cfg.homogeneous_ratio,
                loss_first=metrics[0]["loss"] if metrics else None,
                loss_last=metrics[-1]["loss"] if metrics else None,
                samples_per_s=round(sum(m["batch"] for m in metrics[first_step:]) / max(seconds, 1e-9), 3),
            )
            stats.write(stats_path or f"{out_dir}.stats.json")
            checkpoint.remove()
        ddp.barrier()  # every rank returns once the model is on disk
        if checkpoint_dir and not data_cache and ddp.local_rank == 0:
            remove_cache(cache)  # the checkpoint's companion: a finished run needs neither
        return {"steps": total, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3)}
    finally:
        if scratch is not None:
            scratch.cleanup()
        ddp.close()


def _run(args: argparse.Namespace) -> None:
    cfg = TrainConfig(
        stage=args.stage,
        batch_size=args.batch_size,
        group_size=args.group_size,
        lr=args.lr,
        temperature=args.temperature,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        max_seq_length=args.max_seq_length,
        threads=args.threads,
        focal_gamma=args.focal_gamma,
        mix_negatives=args.mix_negatives,
        matryoshka_dims=tuple(args.matryoshka_dims or ()),
        matryoshka_weights=tuple(args.matryoshka_weights or ()),
        homogeneous_ratio=args.homogeneous_ratio,
        few_negatives=args.few_negatives,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        mini_batch_size=args.mini_batch_size,
        pooling=args.pooling,
        weight_decay=args.weight_decay,
        save_dtype=args.save_dtype,
    )
    train(
        args.model,
        args.data,
        args.out,
        cfg,
        json.loads(args.symmetric),
        args.metrics,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        stop_after_steps=args.stop_after_steps,
        stats_path=args.stats,
        keep_snapshots=args.keep_snapshots,
        snapshot_every=args.snapshot_every,
        in_batch=json.loads(args.in_batch_negatives),
        data_cache=args.data_cache,
    )


def _ratio(value: str) -> float:
    r = float(value)
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError("must lie in [0, 1]")
    return r


def register(sub) -> None:
    p = sub.add_parser("train", help="contrastive pretraining or fine-tuning (torchrun: data parallel)")
    p.add_argument("--stage", choices=["pretrain", "finetune"], required=True)
    p.add_argument("--model", required=True, help="model spec to start from")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="Parquet parts or JSON Lines files, or folders of them (read in this order)",
    )
    p.add_argument(
        "--data-cache",
        help="folder of the Arrow copies of the data, kept "
        "(default: CHECKPOINT_DIR/arrow, removed after the run; without it a temporary folder)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", help="per-step metrics JSONL (default: OUT.metrics.jsonl)")
    p.add_argument("--stats", help="counts JSON (default: OUT.stats.json)")
    p.add_argument("--symmetric", default="{}", help='JSON {"task": bool}: instruction on both sides')
    p.add_argument(
        "--in-batch-negatives",
        default="{}",
        help='JSON {"task": false}: those tasks\' queries see only their own hard negatives',
    )
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split over torchrun ranks)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.01)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW decay of weight matrices (never norms, biases)"
    )
    p.add_argument(
        "--save-dtype",
        choices=sorted(SAVE_DTYPES),
        default="float32",
        help="dtype of the saved model (training always keeps fp32 master weights)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--checkpoint-dir", help="resumable state, outside the declared output (Snakemake deletes those)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    add_pooling_argument(p)
    p.add_argument(
        "--keep-snapshots",
        type=int,
        default=0,
        help="keep the last K models saved every --snapshot-every steps (soup ingredients), in CHECKPOINT_DIR/snapshots",
    )
    p.add_argument("--snapshot-every", type=int, default=0, help="steps between soup snapshots")
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill
    p.add_argument("--focal-gamma", type=float, default=0.0, help="focal reweighting exponent (KaLM V2: 0.5)")
    p.add_argument(
        "--mix-negatives",
        type=int,
        default=0,
        help="synthetic mixed negatives per query (-1: as many as its hard negatives)",
    )
    p.add_argument("--matryoshka-dims", type=int, nargs="+", help="prefix dims for the Matryoshka loss")
    p.add_argument("--matryoshka-weights", type=float, nargs="+", help="one weight per Matryoshka dim")
    p.add_argument(
        "--homogeneous-ratio",
        type=_ratio,
        default=1.0,
        help="share of a batch's slots from its own task; the rest from other tasks (1: task-homogeneous)",
    )
    p.add_argument(
        "--few-negatives",
        choices=FEW_NEGATIVES,
        default="pad_random",
        help="records with fewer than group-size - 1 negatives: drop, pad with random same-task passages, or keep",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="bf16 autocast (auto: on CUDA when supported)"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--mini-batch-size", type=int, default=0, help="GradCache chunk in texts (0: whole batch at once)")
    p.set_defaults(func=_run)
