"""The trainer's data: a small index in memory, the texts memory-mapped (issue 15).

``kalm train`` reads the stage's Parquet parts (``kalm.data.shards``: ``RECORD_SCHEMA``) or JSON Lines
files. Loaded as Python dicts they cost 4.9 KB of RAM per typical fine-tuning record (query,
positive, 7 negatives): ~30 GB per torchrun rank at KaLM's 6M examples. Instead:

1. **Arrow cache.** Each part is converted once, streamed a row group at a time, to an
   *uncompressed* Arrow IPC file (``convert_parts``) of the columns training reads
   (``TEXT_COLUMNS``): random access to a row of a compressed Parquet file would decompress its
   whole row group (8192 rows), i.e. every row group at every step. The cache is
   ``<checkpoint_dir>/arrow/`` (kept across a kill, so a resumed run does not convert again;
   removed with the checkpoint once the model is saved), ``--data-cache`` (kept), or a temporary
   folder. A cached file is named after its part's path, size and mtime: a changed part is
   converted again. It takes about the uncompressed text's size on disk (that of the JSON Lines).
   JSON Lines go through the same path, so one reader serves both. Under torchrun one process per
   node converts (local rank 0) while the others wait at a barrier (without a checkpoint folder
   each rank converts into its own temporary folder: fine for tests and hand use).
2. **Memory map.** ``pa.memory_map`` + ``pa.ipc.open_file`` give record batches whose buffers
   *are* the file's pages (zero-copy): nothing is read until touched, and touched pages are the
   kernel's page cache, file-backed (``RssFile``, not ``RssAnon``), shared by every rank of a
   node and evictable under memory pressure: they do not add up per rank and cannot get a rank
   OOM-killed.
3. **Index.** In RAM stay, per training record, its global row over the parts in ``--data``
   order (``rows``: int32; int64 past 2^31 rows) and its task code (``tasks``: uint16; the
   position of its task's name among the sorted names, so that codes sort as names did). Both
   come from pyarrow compute, a record batch at a time, never a Python object per record:
   ``pc.index_in`` on ``task``, and ``pc.list_value_length`` on ``neg`` (its offsets only) for
   the records short of negatives (``apply_few_negatives``).
4. **Batches.** ``kalm.training.batches.BatchSchedule`` shuffles numpy arrays of rows with
   ``random.Random.shuffle``, which permutes any sequence as it permutes a list: the batches are
   those the former list-of-dicts batcher made (tests/test_train_data.py keeps it as the
   reference). A step reads its global batch's records (``TrainData.records``: a
   ``RecordBatch.take`` per record batch it touches) from the memory map.

**Each rank reads its whole global batch**, not only its slice: the false-negative mask
(``BatchTexts.column_mask``) compares every text of the global batch, every rank's negative
counts size the all-gather, and one RNG stream over the global batch draws the texts one
process would. Exchanging text hashes instead would save reading a batch (~2.5 MB for 512
typical records) from a page cache the ranks share: nothing next to encoding it. What no rank
does any more is load the data set.

**Padding (few_negatives: pad_random).** A record short of hard negatives was padded from an
in-memory pool of every distinct passage of its task. The pool is now the memory map: a random
row of the task, then one of its passages (positives and negatives), rejecting the record's own
positives and negatives and repeats (``TrainData.random_passages``). Passages are thus drawn
with the frequency they have in the task's records rather than uniformly over distinct texts,
and the RNG draws differ: which random passages pad a record changed, nothing else. A task of at
most ``SMALL_TASK_ROWS`` rows is still filtered exactly (a sample of all its distinct candidate
passages), so a small task still yields every passage it has; a large one gives up after
``DRAWS_PER_PASSAGE`` · k + 64 draws (``batch_texts`` then repeats what it found).

**Why not ``datasets``.** Its Arrow cache is the same mechanism (memory-mapped Arrow files), but
adds a fingerprinting cache under ``~/.cache/huggingface`` we would have to place and clean per
run, a second import of a heavy library in every rank, and a row-access path through its
formatters; the ~300 lines here keep the cache beside the checkpoint and its lifetime with it.

Measured (tests/test_train_data.py, 200k records, 208 MB of Arrow text; 1M records for speed):

- index: 6 bytes per record (+4 with pad_random: the rows grouped by task), and the current
  epoch's batches 4 bytes per record (int32 rows): ~84 MB per rank at 6M records, instead of ~30 GB;
- building the index and an epoch's batches: heap peak 5.2 MB (tracemalloc, numpy buffers
  included: ~26 bytes per record of transients, argsort and unique), Arrow memory pool +0;
- reading every batch of an epoch: ``RssAnon`` +4 MB, ``RssFile`` +185 MB (the mapped pages);
- 1M records (~1 GB of text): conversion 1.5 s, index 0.1 s, an epoch's batches 0.9 s (a Python
  shuffle: ~6 s per epoch at 6M), reading a batch of 512 records 13 ms, a padding draw 0.1 ms.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kalm.data.shards import RECORD_SCHEMA, ROW_GROUP_ROWS
from kalm.io import StageStats, atomic_path, read_jsonl
from kalm.training.config import FEW_NEGATIVES

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("task", "query", "pos", "neg", "instruction", "pos_teacher", "neg_teacher")  # teacher: distillation
ARROW_SCHEMA = pa.schema([RECORD_SCHEMA.field(c) for c in TEXT_COLUMNS])
PART_SUFFIXES = (".parquet", ".jsonl")
SMALL_TASK_ROWS = 64  # a task this small is padded from an exact list of its distinct passages
DRAWS_PER_PASSAGE = 32  # rejection sampling: at most this many draws per passage wanted (+ 64)


# --------------------------------------------------------------------------------------------
# Parts and their Arrow cache
# --------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def data_parts(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The data files of ``--data``: files as given, folders as their ``*.parquet`` / ``*.jsonl``
    parts in natural order (p2 before p10). The order is the global row order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                (p for p in path.iterdir() if p.suffix in PART_SUFFIXES and not p.name.startswith(".")),
                key=_natural_key,
            )
            if not found:
                raise FileNotFoundError(f"{path}: no {' or '.join(PART_SUFFIXES)} parts in this folder")
            parts += found
        elif path.exists():
            parts.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such data file or folder")
    if not parts:
        raise ValueError("no training data given")
    return parts


def parts_fingerprint(parts: Sequence[Path]) -> list[dict]:
    """Path, size and mtime of every part: a checkpoint of other data is never resumed."""
    out = []
    for part in parts:
        st = part.stat()
        out.append({"path": str(part), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def arrow_path(part: Path, cache_dir: Path) -> Path:
    """The cached Arrow file of ``part``: named after its absolute path, size and mtime (and the columns)."""
    st = part.stat()
    columns = ",".join(TEXT_COLUMNS)  # a cache of other columns (an older kalm) is not reused
    key = hashlib.sha1(f"{part.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{columns}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{part.stem}-{key}.arrow"


def _conform(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """``batch`` with exactly ``ARROW_SCHEMA``'s columns (absent ones null)."""
    n = batch.num_rows
    cols = [
        batch.column(f.name).cast(f.type) if f.name in batch.schema.names else pa.nulls(n, f.type) for f in ARROW_SCHEMA
    ]
    if isinstance(batch, pa.Table):
        cols = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols]
    return pa.RecordBatch.from_arrays(cols, schema=ARROW_SCHEMA)


def _dict_batches(records: Iterable[dict], rows: int = ROW_GROUP_ROWS) -> Iterable[pa.RecordBatch]:
    """Records (dicts; other fields ignored) as Arrow batches of ``rows``."""
    chunk: list[dict] = []
    for rec in records:
        chunk.append({c: rec.get(c) for c in TEXT_COLUMNS})
        if len(chunk) == rows:
            yield pa.RecordBatch.from_pylist(chunk, schema=ARROW_SCHEMA)
            chunk = []
    if chunk:
        yield pa.RecordBatch.from_pylist(chunk, schema=ARROW_SCHEMA)


def _source_batches(part: Path, rows: int = ROW_GROUP_ROWS) -> Iterable[pa.RecordBatch]:
    """The records of one part as Arrow batches of ``rows`` (streamed: one batch in memory)."""
    if part.suffix == ".jsonl":
        yield from _dict_batches(read_jsonl(part), rows)
        return
    pf = pq.ParquetFile(part)
    columns = [c for c in TEXT_COLUMNS if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=rows, columns=columns):
        yield _conform(batch)


def convert_part(part: Path, dest: Path) -> int:
    """Write ``part`` to ``dest`` as an uncompressed Arrow IPC file (atomically); return its rows."""
    n = 0
    with atomic_path(dest) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, ARROW_SCHEMA) as writer:
        for batch in _source_batches(part):
            if batch.column(0).null_count:
                raise ValueError(f"{part}: records without a task")
            writer.write_batch(batch)
            n += batch.num_rows
    return n


def convert_parts(parts: Sequence[Path], cache_dir: str | os.PathLike) -> list[Path]:
    """The Arrow files of ``parts`` in ``cache_dir``, converting those not there yet."""
    out = []
    for part in parts:
        dest = arrow_path(part, Path(cache_dir))
        if not dest.exists():
            rows = convert_part(part, dest)
            log.info("converted %s (%d records) to %s", part, rows, dest)
        out.append(dest)
    return out


def remove_cache(cache_dir: str | os.PathLike) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The memory-mapped data and its index
# --------------------------------------------------------------------------------------------


def _row_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


class TrainData:
    """Training records: ``rows`` and ``tasks`` in RAM (the index), texts memory-mapped.

    ``rows[i]`` is training record i's global row over the parts (in ``--data`` order), and
    ``tasks[i]`` its task code (``task_names[tasks[i]]``). ``records(rows)`` reads records.
    """

    def __init__(self, batches: list[pa.RecordBatch], sources: list[Path]):
        self.sources = sources
        self._batches = batches
        sizes = np.array([b.num_rows for b in batches], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # global row of each batch
        self.num_rows = int(self._starts[-1])
        names: set[str] = set()
        for b in batches:
            names.update(pc.unique(b.column("task")).to_pylist())
        self.task_names = sorted(names)
        self._code = {t: i for i, t in enumerate(self.task_names)}
        code_type = np.uint16 if len(self.task_names) < 2**16 else np.int32
        values = pa.array(self.task_names, pa.string())
        self.tasks = (
            np.concatenate(
                [pc.index_in(b.column("task"), value_set=values).to_numpy().astype(code_type) for b in batches]
            )
            if batches
            else np.zeros(0, code_type)
        )
        self.rows = np.arange(self.num_rows, dtype=_row_dtype(self.num_rows))
        self.columns = list(TEXT_COLUMNS)
        self._files: list[Path] = []  # the memory-mapped Arrow files (open()), re-mapped by release()
        self._by_task: np.ndarray | None = None  # rows grouped by task (padding only)
        self._task_bounds: np.ndarray | None = None

    @staticmethod
    def _map(arrow_files: Sequence[Path]) -> list[pa.RecordBatch]:
        batches = []
        for path in arrow_files:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            if not reader.schema.equals(ARROW_SCHEMA):
                raise ValueError(f"{path}: not a training Arrow file (schema {reader.schema})")
            batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
        return batches

    @classmethod
    def open(cls, arrow_files: Sequence[Path], sources: Sequence[Path] | None = None) -> TrainData:
        """Memory-map Arrow files (``convert_parts``' output), in order."""
        data = cls(cls._map(arrow_files), list(sources or arrow_files))
        data._files = list(arrow_files)
        data.release()  # the index is built: the task columns' pages leave the process
        return data

    def release(self) -> None:
        """Map the Arrow files afresh, so that the pages read so far leave this process (the old maps close
        with their last batch). A step reads scattered rows, and each read maps its neighbouring pages
        too: without this, a long run's RSS would grow to the whole cache (file-backed, evictable, but what
        a job's ``VmHWM`` and a cluster's memory accounting see). Costs a footer read per file."""
        if self._files:
            self._batches = self._map(self._files)

    @classmethod
    def from_records(cls, records: Iterable[dict], rows_per_batch: int = ROW_GROUP_ROWS) -> TrainData:
        """Records held in memory (tests, hand use): the same index and reads, without a file."""
        return cls(list(_dict_batches(records, rows_per_batch)), [])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def index_nbytes(self) -> int:
        """Bytes of the in-memory index (rows, task codes, and the by-task rows once padding needs them)."""
        extra = 0 if self._by_task is None else self._by_task.nbytes + self._task_bounds.nbytes
        return self.rows.nbytes + self.tasks.nbytes + extra

    # ---- few_negatives -------------------------------------------------------------------------

    def negative_counts(self) -> Iterable[np.ndarray]:
        """Hard negatives per row, a record batch at a time (the list offsets only: no text read)."""
        for b in self._batches:
            yield pc.fill_null(pc.list_value_length(b.column("neg")), 0).to_numpy(zero_copy_only=False)

    def apply_few_negatives(self, n_neg: int, policy: str, stats: StageStats) -> int:
        """Apply ``few_negatives`` to records with fewer than ``n_neg`` hard negatives; count them.

        - ``drop``: the record leaves the index (counted as dropped ``too_few_negatives``);
        - ``pad_random``: at each use, the missing negatives are random passages of the record's
          own task (``random_passages``), never one of its own positives or negatives;
        - ``keep``: the record keeps the negatives it has (a ragged batch: no hard-negative mixing).

        Returns how many records are short. With ``n_neg`` 0 (pretraining) negatives are not read.
        """
        if policy not in FEW_NEGATIVES:
            raise ValueError(f"few_negatives must be one of {FEW_NEGATIVES}, got {policy!r}")
        short = np.concatenate([c < n_neg for c in self.negative_counts()]) if self._batches else np.zeros(0, bool)
        self.release()
        n_short = int(short.sum())
        n_tasks = len(self.task_names)
        seen = np.bincount(self.tasks, minlength=n_tasks)
        dropped = np.bincount(self.tasks[short], minlength=n_tasks) if policy == "drop" else np.zeros(n_tasks, int)
        _, first = np.unique(self.tasks, return_index=True)  # per-task counts in order of first appearance
        for code in self.tasks[np.sort(first)].tolist():
            task = self.task_names[code]
            stats.seen(int(seen[code]), task=task)
            if dropped[code]:
                stats.drop("too_few_negatives", int(dropped[code]), task=task)
            stats.keep(int(seen[code] - dropped[code]), task=task)
        stats.extra.update(few_negatives=policy, negatives_wanted=n_neg, records_short_of_negatives=n_short)
        if n_short:
            log.warning(
                "%d of %d records have fewer than %d hard negatives: %s",
                n_short,
                len(short),
                n_neg,
                {
                    "drop": "dropped",
                    "pad_random": "padded with random passages of their task",
                    "keep": "kept with fewer (ragged batches skip hard-negative mixing)",
                }[policy],
            )
        if policy == "drop" and n_short:
            keep = ~short
            self.rows, self.tasks = self.rows[keep], self.tasks[keep]
        if n_neg == 0:
            self.columns = [c for c in TEXT_COLUMNS if c not in ("neg", "neg_teacher")]
        return n_short

    def scored_by_teacher(self) -> int:
        """Rows with teacher scores (``pos_teacher``; contrastive distillation), over every part."""
        return sum(len(b) - b.column("pos_teacher").null_count for b in self._batches)

    # ---- reading --------------------------------------------------------------------------------

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, rows, side="right") - 1

    def records(self, rows: Sequence[int] | np.ndarray) -> list[dict]:
        """The records of global ``rows``, in that order, as dicts without their null fields
        (``rec.get("neg", [])`` works as for JSON Lines)."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list[dict | None] = [None] * len(rows)
        where = self._locate(rows)
        for bid in np.unique(where).tolist():
            sel = np.flatnonzero(where == bid)
            batch = self._batches[bid].select(self.columns)
            taken = batch.take(pa.array(rows[sel] - self._starts[bid])).to_pylist()
            for i, rec in zip(sel.tolist(), taken):
                out[i] = {k: v for k, v in rec.items() if v is not None}
        self.release()  # copied out (and the padding's reads since the last call): unmap their pages
        return out

    def _passages(self, row: int) -> list[str]:
        """Positives then negatives of one row."""
        bid = int(self._locate(np.array([row]))[0])
        batch, off = self._batches[bid], row - int(self._starts[bid])
        return (batch.column("pos")[off].as_py() or []) + (batch.column("neg")[off].as_py() or [])

    def _task_rows(self, task: str) -> np.ndarray:
        if self._by_task is None:
            order = np.argsort(self.tasks, kind="stable")
            self._by_task = self.rows[order]
            self._task_bounds = np.concatenate(
                [[0], np.cumsum(np.bincount(self.tasks, minlength=len(self.task_names)))]
            )
        code = self._code[task]
        return self._by_task[self._task_bounds[code] : self._task_bounds[code + 1]]

    def random_passages(self, task: str, k: int, exclude: set[str], rng: random.Random) -> list[str]:
        """Up to ``k`` distinct passages (positives or negatives) of ``task``'s records, none in
        ``exclude``: a random row, then one of its passages, rejecting excluded and repeated ones
        (at most ``DRAWS_PER_PASSAGE`` · k + 64 draws). A task of at most ``SMALL_TASK_ROWS`` rows
        is filtered exactly: a sample of all its distinct candidate passages."""
        rows = self._task_rows(task)
        if len(rows) <= SMALL_TASK_ROWS:
            candidates = dict.fromkeys(p for r in rows.tolist() for p in self._passages(r) if p not in exclude)
            return rng.sample(list(candidates), min(k, len(candidates)))
        picked: list[str] = []
        seen = set(exclude)
        for _ in range(DRAWS_PER_PASSAGE * k + 64):
            if len(picked) >= k:
                break
            passages = self._passages(int(rows[rng.randrange(len(rows))]))
            if passages and (p := rng.choice(passages)) not in seen:
                seen.add(p)
                picked.append(p)
        return picked


def open_data(parts: Sequence[Path], cache_dir: str | os.PathLike, convert: bool = True) -> TrainData:
    """Convert (if ``convert``) and memory-map ``parts`` through the Arrow cache ``cache_dir``."""
    files = convert_parts(parts, cache_dir) if convert else [arrow_path(p, Path(cache_dir)) for p in parts]
    return TrainData.open(files, parts)
