"""Shared file helpers: atomic writes, JSON Lines, stage statistics.

Every stage writes through these helpers so that a killed job never leaves a file
that looks finished (write to a temporary sibling, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create 0600/0700: give the output the mode a plain open() would (umask applied),
        # or teammates sharing a cluster project could not read it
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSON Lines atomically; return how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read trusted JSON Lines written by a previous stage (validation is kalm.data.validate's job)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class StageStats:
    """Counts for a stage's stats JSON: ``in == kept + sum(dropped.values())``.

    >>> s = StageStats("dedup"); s.seen(3); s.keep(2); s.drop("exact_duplicate")
    >>> s.as_dict()["dropped"]
    {'exact_duplicate': 1}
    """

    def __init__(self, stage: str, **extra: Any) -> None:
        self.stage = stage
        self.n_in = 0
        self.kept = 0
        self.dropped: dict[str, int] = {}
        self.per_task: dict[str, dict[str, Any]] = {}
        self.extra = dict(extra)
        self._t0 = time.time()

    def _task(self, task: str | None) -> dict[str, Any] | None:
        if task is None:
            return None
        return self.per_task.setdefault(task, {"in": 0, "kept": 0, "dropped": {}})

    def seen(self, n: int = 1, task: str | None = None) -> None:
        self.n_in += n
        if (t := self._task(task)) is not None:
            t["in"] += n

    def keep(self, n: int = 1, task: str | None = None) -> None:
        self.kept += n
        if (t := self._task(task)) is not None:
            t["kept"] += n

    def drop(self, reason: str, n: int = 1, task: str | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        if (t := self._task(task)) is not None:
            t["dropped"][reason] = t["dropped"].get(reason, 0) + n

    def check(self) -> None:
        """Fail loudly when the funnel does not add up: nothing may vanish silently."""
        total = self.kept + sum(self.dropped.values())
        if total != self.n_in:
            raise AssertionError(f"{self.stage}: in={self.n_in} but kept+dropped={total}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "in": self.n_in,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "per_task": self.per_task,
            **self.extra,
            "seconds": round(time.time() - self._t0, 3),
        }

    def write(self, path: str | os.PathLike) -> None:
        self.check()
        write_json(path, self.as_dict())


def read_rows(array: Any, rows: Any) -> Any:
    """``array[rows]`` of a memory-mapped 2-d ``.npy`` (``np.load(..., mmap_mode="r")``) read with ``pread``,
    runs of consecutive rows in one call, without touching the map: a scattered read through a map maps
    ~16 pages around each row (the kernel's fault-around, whatever madvise says), so reading a few
    rows per page of a large file would put the whole file in the process's RSS. Anything else: indexed."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    if not isinstance(array, np.memmap) or array.ndim != 2 or not len(rows):
        return np.asarray(array[rows])
    unique, inverse = np.unique(rows, return_inverse=True)
    if unique[0] < 0 or unique[-1] >= len(array):
        raise IndexError(f"{array.filename}: rows outside 0..{len(array) - 1}")
    out = np.empty((len(unique), array.shape[1]), dtype=array.dtype)
    row_bytes = array.shape[1] * array.dtype.itemsize
    view = memoryview(out.reshape(-1).view(np.uint8))
    starts = np.flatnonzero(np.diff(unique, prepend=-2) != 1)  # first place of each run of consecutive rows
    ends = np.append(starts[1:], len(unique))
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        for a, b in zip(starts.tolist(), ends.tolist()):
            want = (b - a) * row_bytes
            got = os.preadv(fd, [view[a * row_bytes : b * row_bytes]], array.offset + int(unique[a]) * row_bytes)
            if got != want:
                raise OSError(f"{array.filename}: short read ({got} of {want} bytes)")
    finally:
        os.close(fd)
    return out[inverse.reshape(-1)]


def release_pages(*arrays: Any) -> None:
    """Take the resident pages of memory-mapped numpy arrays (``np.load(..., mmap_mode="r")`` and their views)
    out of this process: ``madvise(MADV_DONTNEED)``. Their data stays in the page cache (a later read is a
    minor fault), but the process's RSS and ``VmHWM`` stop counting every page it has read: one random read
    of a memory map maps up to 16 neighbouring pages, so a job that reads scattered rows of a large file
    would otherwise "hold" the whole file. Arrays that are not memory maps are left alone."""
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    for arr in arrays:
        mapping = getattr(arr, "_mmap", None)
        if advice is not None and mapping is not None and not mapping.closed:
            mapping.madvise(advice)


def merge_stats(
    paths: Iterable[str | os.PathLike], stage: str | None = None, settings: Iterable[str] = (), **extra: Any
) -> dict[str, Any]:
    """The stats of one stage run as shard jobs, added up: ``in``, ``kept``, ``dropped`` and
    ``per_task`` are summed (so the funnel still adds up), numeric extras are summed too (so a
    shard's identifier belongs in a string extra, never a number), other extras are kept when
    every shard agrees; ``shards`` counts the inputs, ``seconds`` is the sum.

    ``settings``: extras that are a run's settings (a threshold, ``negative_number``), not counters:
    copied from the shards, which must all agree on them (else it is not one run's shards).
    """
    dicts = [read_json(p) for p in paths]
    if not dicts:
        raise ValueError("merge_stats: no shard stats to merge")
    fixed: dict[str, Any] = {}
    for key in settings:
        values = [d.get(key) for d in dicts]
        if any(v != values[0] for v in values):
            raise ValueError(f"merge stats: the shards disagree on {key!r} ({values[:4]}...): not one run's shards")
        if key in dicts[0]:
            fixed[key] = values[0]
    total = StageStats(stage or dicts[0]["stage"])
    skip = {"stage", "in", "kept", "dropped", "per_task", "seconds", *fixed}
    merged_extra: dict[str, Any] = {}
    for d in dicts:
        total.n_in += d["in"]
        total.kept += d["kept"]
        for reason, n in d["dropped"].items():
            total.dropped[reason] = total.dropped.get(reason, 0) + n
        for task, t in d.get("per_task", {}).items():
            mine = total.per_task.setdefault(task, {"in": 0, "kept": 0, "dropped": {}})
            mine["in"] += t["in"]
            mine["kept"] += t["kept"]
            for reason, n in t["dropped"].items():
                mine["dropped"][reason] = mine["dropped"].get(reason, 0) + n
        for key, value in d.items():
            if key in skip:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged_extra[key] = merged_extra.get(key, 0) + value
            elif key not in merged_extra:
                merged_extra[key] = value
            elif merged_extra[key] != value:
                merged_extra[key] = None  # shards disagree: not a property of the whole stage
    total.check()
    out = total.as_dict()
    out.update(
        {k: v for k, v in merged_extra.items() if v is not None},
        **fixed,
        **extra,
        shards=len(dicts),
        seconds=round(sum(d.get("seconds", 0.0) for d in dicts), 3),
    )
    return out
