"""One file per scatter job: the P partitions of a shuffle's map side as record batches of one Arrow IPC file.

A hash-partitioned shuffle (the exact dedup's scatter, the embed jobs' text scatter) used to write one file
per (input, partition): inputs x partitions files, 8.8 million for KaLM's 470 pretraining files in 18,800
partitions of 25k records, a metadata storm on a cluster file system, and as many outputs for Snakemake to
track. Here a scatter job writes one file; the reduce job of partition ``j`` reads its record batches of
every input's file and nothing else.

Layout: the rows are written in *rounds* of exactly ``P`` record batches, batch ``round * P + j`` holding
partition ``j``'s rows of that round (empty when it has none; an empty batch is a header of a few hundred
bytes). A round is written whenever ``buffer_rows`` rows are buffered over all partitions, so the writer's
memory is bounded whatever ``P`` and the input size, and partition ``j`` is batches ``j, j + P, j + 2P, ...``:
no index to write or read beyond the file's own footer (the batch offsets). ``P`` is in the schema's
metadata, so a reader expecting another ``P`` fails with the file's name. Within a partition the rows keep
their order of writing. Buffers are zstd-compressed (the files are temporary but hold a whole stage).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import pyarrow as pa

from kalm.io import atomic_path

PARTITIONS_KEY = b"kalm.partitions"


class PartitionedWriter:
    """Write tables of one schema, each row to the partition given beside it, into one Arrow IPC file
    atomically (see the module's docstring for the layout). ``rows[j]``: the rows written to partition j."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, partitions: int, buffer_rows: int = 65536):
        if partitions < 1:
            raise ValueError(f"{path}: partitions must be at least 1, not {partitions}")
        self.path, self.partitions, self.buffer_rows = path, partitions, buffer_rows
        self.schema = schema.with_metadata({**(schema.metadata or {}), PARTITIONS_KEY: str(partitions).encode()})
        self.rows = [0] * partitions
        self._pending: list[list[pa.Table]] = [[] for _ in range(partitions)]
        self._buffered = 0
        self._rounds = 0
        self._stack = ExitStack()

    def __enter__(self) -> PartitionedWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        sink = self._stack.enter_context(pa.OSFile(str(tmp), "wb"))
        opts = pa.ipc.IpcWriteOptions(compression="zstd")
        self._writer = self._stack.enter_context(pa.ipc.new_file(sink, self.schema, options=opts))
        return self

    def write(self, table: pa.Table, partition: np.ndarray) -> None:
        """Append ``table``'s rows, row ``i`` to partition ``partition[i]`` (order kept within a partition)."""
        partition = np.asarray(partition, dtype=np.int64)
        if len(partition) != table.num_rows:
            raise ValueError(f"{self.path}: {table.num_rows} rows but {len(partition)} partitions given")
        if len(partition) and (partition.min() < 0 or partition.max() >= self.partitions):
            raise ValueError(f"{self.path}: a partition outside 0..{self.partitions - 1}")
        if not table.schema.equals(self.schema, check_metadata=False):
            table = table.cast(self.schema.remove_metadata())
        order = np.argsort(partition, kind="stable")
        bounds = np.searchsorted(partition[order], np.arange(self.partitions + 1))
        for j in np.flatnonzero(np.diff(bounds)).tolist():
            self._pending[j].append(table.take(order[bounds[j] : bounds[j + 1]]))
        self._buffered += table.num_rows
        if self._buffered >= self.buffer_rows:
            self._write_round()

    def _write_round(self) -> None:
        for j, tables in enumerate(self._pending):
            batches = [b for t in tables for b in t.to_batches() if b.num_rows]
            batch = pa.concat_batches(batches) if batches else pa.RecordBatch.from_pylist([], schema=self.schema)
            self._writer.write_batch(batch)  # exactly one batch per partition and round: the layout
            self.rows[j] += batch.num_rows
        self._pending = [[] for _ in range(self.partitions)]
        self._buffered = 0
        self._rounds += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and (self._buffered or not self._rounds):
            self._write_round()  # the last rows; an empty input still gets its P (empty) batches
        return self._stack.__exit__(exc_type, exc, tb)


def partitions_of(path: str | os.PathLike) -> int:
    """The number of partitions a :class:`PartitionedWriter` file was written with."""
    with pa.OSFile(str(path)) as source:
        return _partitions(pa.ipc.open_file(source), path)


def _partitions(reader: pa.ipc.RecordBatchFileReader, path) -> int:
    meta = reader.schema.metadata or {}
    if PARTITIONS_KEY not in meta:
        raise ValueError(f"{path}: not a partitioned scatter file (no {PARTITIONS_KEY.decode()} in its schema)")
    partitions = int(meta[PARTITIONS_KEY])
    if reader.num_record_batches % partitions:
        raise ValueError(
            f"{path}: {reader.num_record_batches} record batches, not whole rounds of {partitions} partitions "
            "(a truncated or foreign file)"
        )
    return partitions


def _read_options(source: pa.NativeFile, path, columns: list[str] | None) -> pa.ipc.IpcReadOptions | None:
    """Read options that keep ``columns`` only (the file's schema, from its footer, names their places)."""
    if columns is None:
        return None
    names = pa.ipc.open_file(source).schema.names  # the footer only: cheap, and cached by the OS
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; it has {names}")
    return pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])


def read_partition(
    path: str | os.PathLike, partition: int, partitions: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Partition ``partition``'s record batches of ``path`` (non-empty ones, in the order written), only the
    ``columns`` asked for (the others are not read from disk). ``partitions``: the count the reader expects;
    a file written with another fails with its name. Read with ``pread``, not through a memory map, so the
    file's other partitions never enter this process's RSS."""
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source, options=_read_options(source, path, columns))
        found = _partitions(reader, path)
        if found != partitions:
            raise ValueError(f"{path}: scattered into {found} partitions, read as one of {partitions}")
        if not 0 <= partition < partitions:
            raise ValueError(f"{path}: partition {partition} outside 0..{partitions - 1}")
        for b in range(partition, reader.num_record_batches, partitions):
            batch = reader.get_batch(b)
            if batch.num_rows:
                yield batch
