"""kalm.partitioned: one scatter file per job, partition j read back as exactly the rows sent to it, in order, in as
few batches as its rows allow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.partitioned import PartitionedWriter, partitions_of, read_partition

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.large_string())])


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.lists(st.integers(0, 6), max_size=30), max_size=6),
    partitions=st.integers(1, 7),
    buffer_rows=st.integers(1, 40),
)
def test_each_partition_reads_back_its_rows_in_the_order_written(tmp_path_factory, writes, partitions, buffer_rows):
    path = tmp_path_factory.mktemp("part") / "scatter.arrow"
    sent: list[list[tuple[int, str]]] = [[] for _ in range(partitions)]
    row = 0
    with PartitionedWriter(path, SCHEMA, partitions, buffer_rows=buffer_rows) as out:
        for keys in writes:
            part = np.array([k % partitions for k in keys], dtype=np.int64)
            ids = list(range(row, row + len(keys)))
            out.write(pa.table({"id": ids, "text": [f"t{i}" for i in ids]}, schema=SCHEMA), part)
            for i, j in zip(ids, part.tolist()):
                sent[j].append((i, f"t{i}"))
            row += len(keys)
    assert out.rows == [len(s) for s in sent]
    assert partitions_of(path) == partitions
    # the rounds spilled to disk are merged: as few batches as a partition's rows allow, so that a reader of
    # partition j decodes one batch per buffer_rows of its rows, whatever the input size; no spill left
    assert pa.ipc.open_file(path).num_record_batches == partitions * max(1, -(-max(out.rows) // buffer_rows))
    assert list(path.parent.iterdir()) == [path]
    for j in range(partitions):
        got = [(r["id"], r["text"]) for b in read_partition(path, j, partitions) for r in b.to_pylist()]
        assert got == sent[j]
        ids = [i for b in read_partition(path, j, partitions, columns=["id"]) for i in b.column("id").to_pylist()]
        assert ids == [i for i, _ in sent[j]]
        assert all(b.schema.names == ["id"] for b in read_partition(path, j, partitions, columns=["id"]))


def test_a_reader_of_another_partition_count_or_a_foreign_file_fails_with_the_path(tmp_path):
    path = tmp_path / "s.arrow"
    with PartitionedWriter(path, SCHEMA, 3) as out:
        out.write(pa.table({"id": [1, 2], "text": ["a", "b"]}, schema=SCHEMA), np.array([0, 2]))
    with pytest.raises(ValueError, match=rf"{path}: scattered into 3 partitions, read as one of 4"):
        list(read_partition(path, 0, 4))
    with pytest.raises(ValueError, match="partition 3 outside 0..2"):
        list(read_partition(path, 3, 3))
    with pytest.raises(ValueError, match=r"no column\(s\) \['digest'\]"):
        list(read_partition(path, 0, 3, columns=["digest"]))
    plain = tmp_path / "plain.arrow"
    with pa.OSFile(str(plain), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
        w.write_table(pa.table({"id": [1], "text": ["a"]}, schema=SCHEMA))
    with pytest.raises(ValueError, match=f"{plain}: not a partitioned scatter file"):
        list(read_partition(plain, 0, 1))


@pytest.mark.parametrize("buffer_rows", [1, 65536])
def test_a_failed_write_leaves_no_file(tmp_path, buffer_rows):
    """Nothing is left, neither the file nor (buffer_rows=1: a round already spilled) the spill."""
    path = tmp_path / "s.arrow"
    with pytest.raises(ValueError, match="partition outside 0..1"):
        with PartitionedWriter(path, SCHEMA, 2, buffer_rows=buffer_rows) as out:
            out.write(pa.table({"id": [0], "text": ["z"]}, schema=SCHEMA), np.array([1]))
            out.write(pa.table({"id": [1], "text": ["a"]}, schema=SCHEMA), np.array([2]))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_failure_while_merging_the_spill_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "s.arrow"

    def fail(self):
        raise OSError("disk full (test)")
        yield

    monkeypatch.setattr(PartitionedWriter, "_merged_batches", fail)
    with pytest.raises(OSError, match="disk full"):
        with PartitionedWriter(path, SCHEMA, 2, buffer_rows=1) as out:
            out.write(pa.table({"id": [0, 1], "text": ["z", "a"]}, schema=SCHEMA), np.array([1, 0]))
    assert not list(tmp_path.iterdir())
