"""kalm.io's atomic outputs (nothing half-written, and the mode a plain open() gives) and its row reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.io import atomic_path, write_json


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_outputs_get_the_umask_mode_not_the_temp_files(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "stats.json", {"in": 1})
        with atomic_path(tmp_path / "model", is_dir=True) as tmp:
            (tmp / "weights").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "stats.json").stat().st_mode & 0o777 == 0o666 & ~mask  # mkstemp would give 0600
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask  # mkdtemp: 0700


def test_a_failed_write_leaves_neither_output_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 60), st.integers(1, 9)),
    dtype=st.sampled_from(["float16", "float32", "int64"]),
    picks=st.lists(st.integers(0, 10_000), max_size=80),
)
def test_read_rows_equals_indexing_the_memory_map(tmp_path_factory, shape, dtype, picks):
    """kalm.io.read_rows (pread, runs of rows coalesced) gives the rows memmap indexing gives: any order,
    repeats, runs."""
    from kalm.io import read_rows

    path = tmp_path_factory.mktemp("rows") / "a.npy"
    data = np.arange(shape[0] * shape[1]).astype(dtype).reshape(shape)
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    rows = [p % shape[0] for p in picks]
    got = read_rows(mapped, rows)
    assert got.dtype == data.dtype and got.shape == (len(rows), shape[1])
    assert np.array_equal(got, np.asarray(mapped[np.asarray(rows, dtype=np.int64)]))
    with pytest.raises(IndexError):
        read_rows(mapped, [shape[0]])
