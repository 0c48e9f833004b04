"""False negatives from identical texts: which columns leave each query's denominator.

A contrastive batch lays out B positives (column i belongs to query i) and then every hard
negative of the batch. When texts repeat, plain InfoNCE counts a query's own positive again as a
negative: with task-homogeneous batches of classification data, whose positives are label texts
(tnews: 15 labels), query i's own label sits ~34 times among the in-batch positives and ~240 times
among the hard negatives of a 512-query batch, so p_i <= 1/270 however good the model is, and
focal weighting ((1 - p_i)^γ) sees every example as hard. Symmetric pairs (a, b) and (b, a) in one
batch do the same. In query i's row this module masks (leaves out of the softmax)

- every column whose text equals query i's positive, except its own column i (``false negatives``);
- every column whose text equals query i itself (``false negatives``);
- every repeat of a text already present in the row (``duplicates``): each distinct text counts
  once, so the loss of a batch with repeated texts equals that of the same batch with the repeats
  removed (a test);
- with ``in_batch`` False for query i (a task's ``in_batch_negatives: false``, FlagEmbedding's
  ``no_in_batch_neg``): every column but its own positive and its own hard negatives.

Texts are compared exactly, after the formatting the model sees (instruction prefixes included):
two columns with identical input get identical embeddings, so one of them is always a false
negative. Near-identical texts are the miner's business (ranking-consistency filter, margin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ColumnMask:
    mask: torch.Tensor | None  # bool (B, P), True = left out of the row's denominator; None = nothing masked
    false_negatives: int  # (row, column) pairs masked as identical to the row's positive or query
    duplicates: int  # (row, column) pairs masked as a repeat of a text already in the row


def _ids(texts: list[str], table: dict[str, int]) -> torch.Tensor:
    return torch.tensor([table.setdefault(t, len(table)) for t in texts], dtype=torch.long)


def false_negative_mask(
    queries: list[str],
    passages: list[str],
    own_negatives: list[range] | None = None,
    in_batch: list[bool] | None = None,
) -> ColumnMask:
    """The mask of :func:`kalm.losses.info_nce`'s ``mask`` argument for one batch.

    ``passages``: the B positives, then the negatives; ``own_negatives[i]``: the columns of query
    i's hard negatives (needed only where ``in_batch[i]`` is False).
    """
    b, n = len(queries), len(passages)
    table: dict[str, int] = {}
    pid = _ids(passages, table)
    qid = _ids(queries, table)
    cols = torch.arange(n)
    own = cols[None, :] == torch.arange(b)[:, None]  # (B, P): column i of row i
    identical = ((pid[None, :] == pid[:b, None]) | (pid[None, :] == qid[:, None])) & ~own
    # first occurrence of each text among the columns
    first = torch.full((len(table),), n, dtype=torch.long).scatter_reduce(0, pid, cols, reduce="amin")
    repeat = (first[pid] != cols)[None, :] & ~identical & ~own  # broadcast: a new (B, P) tensor
    mask = identical | repeat
    if in_batch is not None and not all(in_batch):
        for i, allowed in enumerate(in_batch):
            if not allowed:  # only its positive and its own negatives, each distinct text once
                keep = [i] + [j for j in own_negatives[i] if not identical[i, j]]
                keep = list({int(pid[j]): j for j in reversed(keep)}.values())  # first column of each text
                repeat[i] = False
                repeat[i, [j for j in own_negatives[i] if j not in keep and not identical[i, j]]] = True
                mask[i] = True
                mask[i, keep] = False
    counts = int(identical.sum()), int(repeat.sum())
    return ColumnMask(mask if bool(mask.any()) else None, *counts)
