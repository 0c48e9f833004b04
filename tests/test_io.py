"""kalm.io's atomic outputs: nothing half-written, and the mode a plain open() gives."""

from __future__ import annotations

import os

import pytest

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
