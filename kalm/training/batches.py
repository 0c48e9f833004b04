"""Batches: which records a step trains on (a pure function of seed and step), and their texts and
negatives (``batch_texts``)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kalm.evaluation.instructions import format_passage, format_query
from kalm.losses import (
    ColumnMask,
    false_negative_mask,
)
from kalm.training.config import TrainConfig

log = logging.getLogger(__name__)


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


def mix_rows(
    rows: np.ndarray, tasks: np.ndarray, mix: Mapping[int, tuple[float, int | None]], rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's rows under per-task sampling weights and caps (the data mix).

    ``mix``: {task code: (weight, max_records)}. A task keeps ``m = min(n, max_records)`` of its ``n``
    rows, a fresh random subset each epoch (``rng``), and contributes ``round(weight * m)`` rows: whole
    copies of the subset, then a random part of it (weight < 1 subsamples, > 1 repeats). Tasks not in
    ``mix`` keep their rows once. The counts, hence the steps of an epoch, are the same every epoch."""
    out_rows, out_tasks = [], []
    order = np.argsort(tasks, kind="stable")  # each task's rows in row order, as task_homogeneous_batches groups
    codes, starts = np.unique(tasks[order], return_index=True)
    for code, idx in zip(codes.tolist(), np.split(rows[order], starts[1:])):
        weight, cap = mix.get(code, (1.0, None))
        m = min(len(idx), cap or len(idx))
        # a subset only when capped (order does not matter: the batcher shuffles), drawn without a full permutation
        kept = idx if m == len(idx) else idx[np.sort(np.asarray(rng.sample(range(len(idx)), m), dtype=np.int64))]
        whole, part = divmod(int(round(weight * m)), m)
        extra = kept[np.asarray(rng.sample(range(m), part), dtype=np.int64)] if part else kept[:0]
        chosen = np.concatenate([kept] * whole + [extra])
        out_rows.append(chosen)
        out_tasks.append(np.full(len(chosen), code, dtype=tasks.dtype))
    if not out_rows:
        return rows, tasks
    return np.concatenate(out_rows), np.concatenate(out_tasks)


class BatchSchedule:
    """The batch (global rows) of every global step: a pure function of (seed, step), so resume is exact.

    ``rows``/``tasks``: the training records' global rows and task codes (``TrainData``).
    Epoch e's batches come from ``random.Random(f"{seed}:epoch:{e}")``; the current epoch's list is
    cached, since rebuilding it (a shuffle of every record) at every step costs O(records).
    """

    def __init__(
        self,
        rows: np.ndarray,
        tasks: np.ndarray,
        cfg: TrainConfig,
        mix: Mapping[int, tuple[float, int | None]] | None = None,
    ):
        self.rows, self.tasks, self.cfg, self.mix = rows, tasks, cfg, dict(mix or {})
        self._epoch, self._batches = -1, []
        n_codes = int(np.max(tasks)) + 1 if len(tasks) else 0
        self.task_counts = np.bincount(
            np.asarray(self._epoch_rows(0)[1]), minlength=n_codes
        )  # records per task and epoch
        self.steps_per_epoch = len(self._epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError("fewer than two records: no batch with an in-batch negative can be made")
        self.left_out_per_epoch = records_left_out_per_epoch(self.task_counts.tolist(), cfg.batch_size)

    def _epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's rows and task codes: all records once, or the data mix's (:func:`mix_rows`, from
        its own seeded stream, so that runs without a mix keep their batches)."""
        if not self.mix:
            return self.rows, self.tasks
        return mix_rows(self.rows, self.tasks, self.mix, random.Random(f"{self.cfg.seed}:mix:{epoch}"))

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            rng = random.Random(f"{self.cfg.seed}:epoch:{epoch}")
            rows, tasks = self._epoch_rows(epoch)
            self._batches = task_homogeneous_batches(rows, tasks, self.cfg.batch_size, rng, self.cfg.homogeneous_ratio)
            self._epoch = epoch
        return self._batches

    def __call__(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        return self._epoch_batches(epoch)[position]


# ---- texts and negatives ----------------------------------------------------------------------


@dataclass
class BatchTexts:
    queries: list[str]
    positives: list[str]  # one per query
    negatives: list[list[str]]  # each query's hard negatives
    in_batch: list[bool] = field(default_factory=list)  # per query: False = its own negatives only
    padded: int = 0  # random negatives added to records short of negatives
    short: int = 0  # records still short (ragged) after that
    teacher: list[list[float] | None] = field(default_factory=list)  # per query: the teacher's score of its
    # positive and of each of its negatives (NaN: a random pad); None: its record has no teacher scores

    def passages(self, lo: int = 0, hi: int | None = None) -> list[str]:
        """Positives of queries lo..hi, then their negatives in query order (``info_nce``'s layout)."""
        return self.positives[lo:hi] + [n for negs in self.negatives[lo:hi] for n in negs]

    def negs_per_query(self) -> int:
        """The common number of negatives per query, or 0 when they differ (ragged batch)."""
        counts = {len(n) for n in self.negatives}
        return counts.pop() if len(counts) == 1 else 0

    def distill_targets(self):
        """(candidates, teacher) for ``kalm.losses.distill.distill_kl``: per query, the columns of its positive
        and its own negatives in ``passages()`` (-1 past its count) and their teacher scores (NaN: none);
        None when no query of the batch has a teacher score."""
        import torch

        if all(row is None for row in self.teacher):
            return None
        width = 1 + max(map(len, self.negatives), default=0)
        cols = torch.full((len(self.queries), width), -1, dtype=torch.long)
        scores = torch.full((len(self.queries), width), float("nan"))
        start = len(self.positives)
        for i, (negs, row) in enumerate(zip(self.negatives, self.teacher)):
            cols[i, 0] = i
            cols[i, 1 : 1 + len(negs)] = torch.arange(start, start + len(negs))
            if row is not None:
                scores[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
            start += len(negs)
        return cols, scores

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
    nan = float("nan")
    for rec in batch:
        instr, sym = rec.get("instruction"), symmetric.get(rec["task"], False)
        out.in_batch.append((in_batch or {}).get(rec["task"], True))
        out.queries.append(format_query(rec["query"], instr))
        # indices drawn as the texts were (choice / sample of a range of the same length: the same
        # draws), so that each chosen text keeps its teacher score (distillation)
        i_pos = rng.choice(range(len(rec["pos"])))
        out.positives.append(format_passage(rec["pos"][i_pos], instr, sym))
        negs = rec.get("neg", [])
        neg_teacher = rec.get("neg_teacher") or [nan] * len(negs)
        if len(negs) >= n_neg:
            picked = rng.sample(range(len(negs)), n_neg)
            chosen, scores = [negs[j] for j in picked], [neg_teacher[j] for j in picked]
        else:
            chosen, scores = list(negs), list(neg_teacher)
            if pad is not None:
                chosen += pad(rec["task"], n_neg - len(chosen), set(rec["pos"]) | set(negs), rng)
                scores += [nan] * (len(chosen) - len(scores))  # a random pad has no teacher score
                while chosen and len(chosen) < n_neg:
                    j = rng.choice(range(len(chosen)))
                    chosen.append(chosen[j])
                    scores.append(scores[j])
                out.padded += len(chosen) - len(negs)
            out.short += len(chosen) < n_neg
        out.negatives.append([format_passage(n, instr, sym) for n in chosen])
        out.teacher.append([rec["pos_teacher"][i_pos], *scores] if rec.get("pos_teacher") else None)
    return out
