"""Record output and stats gathering shared by the sharded stages (validate, decontaminate, mine).

- :func:`record_writer`: one writer for a stage's output, Parquet (``kalm.shards.ShardWriter``,
  the format between stages) when the path ends with ``.parquet``, JSON Lines otherwise (for hand
  use); both atomic.
- :func:`merge_stage_stats`: ``kalm.io.merge_stats`` for stages whose stats carry *settings*
  (a threshold, ``negative_number``): merge_stats sums every numeric extra, which is right for
  counters and wrong for settings, so the settings are taken from the shards instead, after
  checking that every shard ran with the same ones.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from kalm.io import atomic_path, merge_stats, read_json


class _JsonlWriter:
    def __init__(self, f):
        self._f, self.rows = f, 0

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.rows += 1


@contextlib.contextmanager
def record_writer(path: str | os.PathLike) -> Iterator[Any]:
    """A writer with ``.write(record)`` for ``path``: a Parquet shard or JSON Lines, by suffix."""
    if str(path).endswith(".parquet"):
        from kalm.shards import ShardWriter

        with ShardWriter(path) as w:
            yield w
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield _JsonlWriter(f)


def merge_stage_stats(paths: Iterable[str | os.PathLike], settings: Iterable[str], stage: str | None = None,
                      **extra: Any) -> dict[str, Any]:
    """Merge shard stats (counts summed, ``kalm.io.merge_stats``); the extras named in ``settings``
    are copied from the shards, which must agree on them (a shard run with other settings is an error)."""
    paths = list(paths)
    settings = list(settings)
    dicts = [read_json(p) for p in paths]
    fixed: dict[str, Any] = {}
    for key in settings:
        values = [d.get(key) for d in dicts]
        if any(v != values[0] for v in values):
            raise ValueError(f"merge stats: the shards disagree on {key!r} ({values[:4]}...): not one run's shards")
        if key in dicts[0]:
            fixed[key] = values[0]
    return merge_stats(paths, stage=stage, **fixed, **extra)
