"""The on-disk format between the data stages: Parquet shards with one declared Arrow schema.

Every stage after validation reads and writes records as Parquet files of ``RECORD_SCHEMA``
(JSON Lines and Parquet in any layout stay accepted as the *input* of ``kalm validate``):

- ``task``, ``query``, ``pos``, ``neg``, ``instruction``: the KaLM record (``neg`` and
  ``instruction`` null when absent);
- ``id``: the record's place in the stage's input order, ``(input shard ordinal << 32) | row``
  (given by ``kalm validate``), so that sharded stages can keep "the first occurrence in input
  order" whatever the number of shards and partitions;
- ``neg_ranks``, ``neg_scores``, ``pos_score``: what mining adds (null before);
- ``pos_teacher``, ``neg_teacher``: a teacher's cosine score of each positive and negative
  (``kalm teacher-score``, for contrastive distillation; null before).

Writes are atomic (a temporary sibling renamed into place, ``kalm.io.atomic_path``) and cut into
row groups of ``ROW_GROUP_ROWS`` records, the unit of streaming: a reader holds one row group's
batch at a time, never the file, so a shard of many GB is read in bounded memory.

As records, rows are plain dicts without the null fields (``rec.get("neg", [])`` works as for
JSON Lines), so stage code is the same for both.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kalm.io import atomic_path

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("pos", pa.list_(pa.string()), nullable=False),
        pa.field("neg", pa.list_(pa.string())),
        pa.field("instruction", pa.string()),
        pa.field("neg_ranks", pa.list_(pa.int32())),
        pa.field("neg_scores", pa.list_(pa.float64())),
        pa.field("pos_score", pa.float64()),
        pa.field("pos_teacher", pa.list_(pa.float32())),
        pa.field("neg_teacher", pa.list_(pa.float32())),
    ]
)
FIELDS = tuple(RECORD_SCHEMA.names)
ROW_GROUP_ROWS = 8192  # ~4 MB of typical fine-tuning records (query, positive, 7 negatives)


def record_id(shard_ordinal: int, row: int) -> int:
    """The ``id`` of row ``row`` (0-based) of input shard ``shard_ordinal``: input order as an int64."""
    if not 0 <= row < 2**32 or not 0 <= shard_ordinal < 2**31:
        raise ValueError(f"record id out of range: shard {shard_ordinal}, row {row}")
    return (shard_ordinal << 32) | row


class ShardWriter:
    """Write records (dicts) to one Parquet shard atomically, a row group per ``row_group_rows``.

    >>> with ShardWriter("part0.parquet") as w:  # doctest: +SKIP
    ...     w.write({"task": "t", "query": "q", "pos": ["p"]})
    """

    def __init__(self, path: str | os.PathLike, row_group_rows: int = ROW_GROUP_ROWS):
        self.path, self.row_group_rows = Path(path), row_group_rows
        self.rows = 0
        self._buffer: list[dict] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ShardWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, RECORD_SCHEMA, compression="zstd"))
        return self

    def write(self, rec: dict) -> None:
        self._buffer.append(rec)
        if len(self._buffer) >= self.row_group_rows:
            self._flush()

    def write_all(self, records: Iterable[dict]) -> int:
        for rec in records:
            self.write(rec)
        return self.rows + len(self._buffer)

    def _flush(self) -> None:
        if not self._buffer:
            return
        unknown = set().union(*self._buffer) - set(FIELDS)
        if unknown:
            raise ValueError(f"{self.path}: record fields {sorted(unknown)} are not in the shard schema {list(FIELDS)}")
        table = pa.Table.from_pylist(self._buffer, schema=RECORD_SCHEMA)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += len(self._buffer)
        self._buffer.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._flush()
        return self._stack.__exit__(exc_type, exc, tb)


def write_shard(path: str | os.PathLike, records: Iterable[dict], row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Write ``records`` to one shard atomically; return how many were written."""
    with ShardWriter(path, row_group_rows) as w:
        return w.write_all(records)


class _JsonlWriter:
    def __init__(self, f):
        self._f, self.rows = f, 0

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.rows += 1


@contextlib.contextmanager
def record_writer(path: str | os.PathLike) -> Iterator:
    """A writer with ``.write(record)`` for a stage's output: a Parquet shard (``ShardWriter``, the
    format between stages) when ``path`` ends with ``.parquet``, JSON Lines otherwise (hand use);
    both atomic."""
    if str(path).endswith(".parquet"):
        with ShardWriter(path) as w:
            yield w
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield _JsonlWriter(f)


def _as_record(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def iter_shard(
    path: str | os.PathLike, columns: list[str] | None = None, batch_rows: int = ROW_GROUP_ROWS
) -> Iterator[dict]:
    """The records of one shard in file order, streamed a batch at a time (JSON Lines too)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from kalm.io import read_jsonl

        yield from read_jsonl(path)
        return
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        for row in batch.to_pylist():
            yield _as_record(row)


def iter_records(paths: Iterable[str | os.PathLike], columns: list[str] | None = None) -> Iterator[dict]:
    """The records of several shards, one after the other."""
    for path in paths:
        yield from iter_shard(path, columns)


def count_rows(path: str | os.PathLike) -> int:
    """Rows of a shard from its footer (Parquet) or by counting lines (JSON Lines)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return pq.ParquetFile(path).metadata.num_rows


def _merge_stats(args) -> None:
    from kalm.io import merge_stats, write_json

    write_json(args.out, merge_stats(args.inputs, stage=args.stage))


def register(sub) -> None:
    p = sub.add_parser("shards", help="helpers of the sharded data stages (merge-stats: add up shard stats)")
    steps = p.add_subparsers(dest="action", required=True)
    m = steps.add_parser("merge-stats", help="add up the stats JSON of a stage's shard jobs into one")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--stage", help="stage name of the merged stats (default: the shards')")
    m.set_defaults(func=_merge_stats)
