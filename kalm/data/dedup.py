"""Exact deduplication of a stage as a hash-partitioned shuffle (and the ``kalm dedup`` command).

Two records are duplicates when their normalised query and normalised set of positives are equal
(NFKC, whitespace folded, case-folded: ``kalm.text.record_hash``, a 16-byte digest). The first
occurrence in input order -- the smallest record ``id`` (``kalm.data.shards``) -- is kept; every drop is
counted per task. The stage runs as Snakemake jobs whose memory depends on their shard, never on
the corpus (``workflow/rules/dedup.smk``):

1. ``scatter`` (one job per validated part, or per run of ``data.dedup.scatter_jobs`` contiguous parts):
   each record goes to partition ``digest % P``; the job writes one file, the records plus their
   ``digest`` column as record batches of each partition (``kalm.partitioned``: one file per job, not
   P). Memory: one input batch and at most ``SCATTER_BUFFER_ROWS`` records buffered over all partitions.
2. ``exact`` (one job per partition): reads partition ``j``'s batches of every scatter file. All copies
   of a record share a digest, hence a partition, so keeping the smallest ``id`` of each digest there is
   the global first occurrence. Pass 1 reads only ``id`` and ``digest`` (24 bytes a record of the
   partition) and sorts them; pass 2 streams the records and writes the kept ones in ``id`` order.
   The result is the same whatever ``P`` (tests/test_dedup_shuffle.py).

With ``data.dedup.near_dup`` the exact partitions go on to near-duplicate removal
(``kalm.data.near_dedup``: minhash, buckets, components, filter); ``stats`` (the gather) adds up the
partition stats of both into the stage's funnel, ``dedup.stats.json``.

Every step is a ``kalm dedup --step STEP`` command (see ``register``); ``kalm dedup IN... --out
FILE --stats S`` (step ``run``, the default) runs all of them in one process on a few files, for
use by hand and the benchmark: JSON Lines or Parquet in (records without an ``id`` get one by input
order), one ``.jsonl`` or ``.parquet`` file out in input order.

Changed from the single-job version: the exact step no longer holds every digest of the stage in
one process, and ``--shard-out`` (round-robin scatter of the kept records) is gone: partitions are
by digest, and records carry their ``id``, so input order needs no round-robin.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm import options
from kalm.data.config import DedupConfig
from kalm.data.shards import RECORD_SCHEMA, ROW_GROUP_ROWS, iter_shard, record_id, write_shard
from kalm.io import StageStats, atomic_path, merge_stats, read_json, write_json
from kalm.partitioned import PartitionedWriter, read_partition
from kalm.text import record_hash

log = logging.getLogger(__name__)

DIGEST = pa.field("digest", pa.binary(16), nullable=False)
SCATTER_SCHEMA = RECORD_SCHEMA.append(DIGEST)
SCATTER_BUFFER_ROWS = ROW_GROUP_ROWS  # most records a scatter job buffers over all its partitions (the rounds are
# merged at the end, kalm.partitioned: the buffer bounds memory, not the batches a partition job reads)


# ---- Parquet helpers -------------------------------------------------------------------------


class TableWriter:
    """Write Arrow tables of one schema to a Parquet file atomically, in row groups of exactly
    ``row_group_rows`` rows (the last one shorter), whatever the sizes of the tables written: the
    file's bytes depend on its rows only, so a re-run writes the same file."""

    def __init__(
        self, path: str | os.PathLike, schema: pa.Schema = RECORD_SCHEMA, row_group_rows: int = ROW_GROUP_ROWS
    ):
        self.path, self.schema, self.row_group_rows = Path(path), schema, row_group_rows
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._stack = ExitStack()

    def __enter__(self) -> TableWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, self.schema, compression="zstd"))
        return self

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    @property
    def buffered(self) -> int:
        return self._pending_rows

    def _flush(self, final: bool) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        full = table.num_rows if final else table.num_rows - table.num_rows % self.row_group_rows
        for start in range(0, full, self.row_group_rows):
            self._writer.write_table(
                table.slice(start, min(self.row_group_rows, full - start)), row_group_size=self.row_group_rows
            )
        self.rows += full
        rest = table.slice(full)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._flush(final=True)
        return self._stack.__exit__(exc_type, exc, tb)


def conform(table: pa.Table | pa.RecordBatch, schema: pa.Schema = RECORD_SCHEMA) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order (absent ones null)."""
    cols = []
    for field in schema:
        if field.name in table.schema.names:
            col = table.column(field.name)
            cols.append(col if col.type == field.type else col.cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=schema)


def iter_tables(
    path: str | os.PathLike, columns: list[str] | None = None, batch_rows: int = ROW_GROUP_ROWS
) -> Iterator[pa.Table]:
    """A Parquet file as tables of at most ``batch_rows`` rows (one batch in memory at a time)."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
        yield pa.Table.from_batches([batch])


def ids_of(table: pa.Table) -> np.ndarray:
    col = table.column("id")
    if col.null_count:
        raise ValueError("records without an id (kalm validate gives every record its id)")
    return col.to_numpy().astype(np.int64, copy=False)


def _digests(table: pa.Table) -> np.ndarray:
    """The ``digest`` column as a ``(hi, lo)`` structured array (big-endian halves of the 128 bits)."""
    arr = table.column("digest").combine_chunks()
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * 16 : (arr.offset + len(arr)) * 16]
    return data.view(np.dtype([("hi", ">u8"), ("lo", ">u8")]))


def task_counts(table: pa.Table, mask: np.ndarray | None = None) -> Counter:
    tasks = table.column("task").to_pylist()
    if mask is None:
        return Counter(tasks)
    return Counter(t for t, m in zip(tasks, mask) if m)


def add_counts(stats: StageStats, seen: Counter, kept: Counter, reason: str) -> None:
    for task, n in sorted(seen.items()):
        stats.seen(n, task=task)
        stats.keep(kept.get(task, 0), task=task)
        if n - kept.get(task, 0):
            stats.drop(reason, n - kept.get(task, 0), task=task)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` of an array (flattened): its distinct values, ascending, by a sort and a
    comparison of neighbours. numpy 2.4's ``np.unique`` hashes first and is ~10x slower on the integer keys
    of these stages (measured 2026-12-07: 0.88 s against 0.05 s for 1M random uint64; 2.48 s against 0.26 s
    for 4M int64 with repeats)."""
    s = np.sort(np.ravel(values))
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) > 1 else s


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Membership of ``values`` in the sorted array ``sorted_set`` (a memory map works)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    return np.asarray(sorted_set[np.minimum(pos, len(sorted_set) - 1)]) == values


# ---- step 1: scatter ---------------------------------------------------------------------------


def partition_index(name: str) -> int:
    """The index J of a partition named ``pJ`` (the rules' ``--partition p{j}``)."""
    if not (name.startswith("p") and name[1:].isdigit()):
        raise SystemExit(f"--partition {name}: expected pJ, J the partition's index (e.g. p3)")
    return int(name[1:])


def partition_of(digest: bytes, partitions: int) -> int:
    """The partition of a record: its 128-bit digest (``record_hash``, big-endian) mod ``partitions``."""
    return int.from_bytes(digest, "big") % partitions


def scatter_parts(
    input_paths: list[str], out_path: str, partitions: int, batch_rows: int = ROW_GROUP_ROWS
) -> list[int]:
    """Scatter validated parts (a contiguous run of the stage's parts, in input order) over ``partitions``
    partitions (record to ``digest % P``, in file order) into one file of record batches per partition
    (:class:`kalm.partitioned.PartitionedWriter`); return the record count of each partition. Several
    parts to one file (``data.dedup.scatter_jobs``) keep the files an exact-dedup job reads, and the
    batches it decodes, from growing with the number of input files."""
    with PartitionedWriter(out_path, SCATTER_SCHEMA, partitions, buffer_rows=SCATTER_BUFFER_ROWS) as out:
        for input_path in input_paths:
            for table in iter_tables(input_path, batch_rows=batch_rows):
                table = conform(table)
                ids_of(table)
                digests = [
                    bytes.fromhex(record_hash(q, p))
                    for q, p in zip(table.column("query").to_pylist(), table.column("pos").to_pylist())
                ]
                part = np.fromiter((partition_of(d, partitions) for d in digests), dtype=np.int64, count=len(digests))
                out.write(table.append_column(DIGEST, pa.array(digests, type=DIGEST.type)), part)
            # mimalloc (Arrow's pool) keeps the pages a file's reading freed: without this the job's peak grew
            # with the parts it reads (1 -> 10 parts of 12.5k records: 116 -> 170 MiB read alone; 110 -> 130)
            pa.default_memory_pool().release_unused()
    log.info("scatter %s: %d records over %d partitions", " ".join(input_paths), sum(out.rows), partitions)
    return out.rows


# ---- step 2: exact dedup of one partition ------------------------------------------------------


def first_occurrences(ids: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """The sorted ids of the first occurrence (smallest id) of each digest; ids must be unique."""
    if not len(ids):
        return np.empty(0, dtype=np.int64)
    sorted_ids = np.sort(ids)
    if (sorted_ids[1:] == sorted_ids[:-1]).any():
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0]
        raise ValueError(f"record id {dup} occurs twice: ids must be unique (kalm validate gives them)")
    del sorted_ids
    hi, lo = np.asarray(digests["hi"]), np.asarray(digests["lo"])
    order = np.lexsort((ids, lo, hi))
    h, l = hi[order], lo[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (h[1:] != h[:-1]) | (l[1:] != l[:-1])
    return np.sort(ids[order[first]])


def _partition_tables(path: str, partition: int, partitions: int, columns=None) -> Iterator[pa.Table]:
    for batch in read_partition(path, partition, partitions, columns):
        yield pa.Table.from_batches([batch])


def _partition_table(path: str, partition: int, partitions: int, columns: list[str]) -> pa.Table:
    tables = list(_partition_tables(path, partition, partitions, columns))
    return pa.concat_tables(tables) if tables else SCATTER_SCHEMA.empty_table().select(columns)


def coalesced(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """``tables`` concatenated, in order, into tables of at least ``rows`` rows (the last one shorter): a
    partition gets a small batch from each part (~300 records at 40 parts), and filtering and counting
    each one cost ~0.4 ms a part (the exact dedup's time per record grew 1.13x from 8 to 80 parts)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        if held >= rows:
            yield pa.concat_tables(pending)
            pending, held = [], 0
    if pending:
        yield pa.concat_tables(pending)


def _in_id_order(inputs: list[str], id_arrays: list[np.ndarray], partition: int, partitions: int) -> Iterator[pa.Table]:
    """Partition ``partition``'s tables of the scatter files ``inputs`` in id order (``id_arrays``: each
    file's ids, from pass 1): the files one after the other when each is sorted and their id ranges do
    not overlap (the case of parts listed in input order), else a k-way merge by id (one batch of each
    file in memory)."""
    ranges = [(int(ids[0]), int(ids[-1]), path) for path, ids in zip(inputs, id_arrays) if len(ids)]
    sorted_files = all(not (np.diff(ids) <= 0).any() for ids in id_arrays)
    ranges.sort()
    if sorted_files and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])):
        for _, _, path in ranges:
            yield from _partition_tables(path, partition, partitions)
        return
    log.warning("partition files are not in id order one after the other: merging them by id")

    def rows(path):
        for table in _partition_tables(path, partition, partitions):
            yield from table.to_pylist()

    merged = heapq.merge(*(rows(p) for p in inputs), key=lambda r: r["id"])
    while batch := list(itertools.islice(merged, ROW_GROUP_ROWS)):
        yield pa.Table.from_pylist(batch, schema=SCATTER_SCHEMA)


def dedup_partition(inputs: list[str], partition: int, partitions: int, out_path: str, stats_path: str) -> StageStats:
    """Exact dedup of partition ``partition`` of ``partitions``: its record batches of every scatter
    file (``inputs``) in, the first occurrence of each digest out (in id order), with stats."""
    id_arrays, digests = [], []
    for path in inputs:
        t = _partition_table(path, partition, partitions, ["id", "digest"])  # pass 1: 24 bytes a record
        id_arrays.append(ids_of(t))
        digests.append(_digests(t).copy())
    ids_all = np.concatenate(id_arrays) if id_arrays else np.empty(0, dtype=np.int64)
    dig_all = np.concatenate(digests) if digests else np.empty(0, dtype=np.dtype([("hi", ">u8"), ("lo", ">u8")]))
    del digests
    kept_ids = first_occurrences(ids_all, dig_all)
    del ids_all, dig_all
    stats = StageStats("dedup", method="exact", partition=f"p{partition}")
    seen, kept = Counter(), Counter()
    with TableWriter(out_path) as out:
        for table in coalesced(_in_id_order(inputs, id_arrays, partition, partitions), ROW_GROUP_ROWS):
            keep = in_sorted(ids_of(table), kept_ids)
            seen += task_counts(table)
            kept += task_counts(table, keep)
            out.write(conform(table.filter(pa.array(keep))))
    add_counts(stats, seen, kept, "exact_duplicate")
    if stats.kept != len(kept_ids):
        raise RuntimeError(f"{out_path}: kept {stats.kept} records but found {len(kept_ids)} first occurrences")
    stats.write(stats_path)
    log.info("exact dedup %s: %d in, %d kept", out_path, stats.n_in, stats.kept)
    return stats


# ---- gather: the stage's funnel ----------------------------------------------------------------


def gather_stats(
    exact_stats: list[str],
    out_path: str,
    near_stats: list[str] | None = None,
    components: str | None = None,
    params: dict | None = None,
) -> dict:
    """Add up the partition stats into the stage's ``dedup.stats.json``: ``in`` and each task's
    ``in`` from the exact step, ``kept`` from the last step, ``dropped`` from both; checked."""
    ex = merge_stats(exact_stats, stage="dedup")
    total = StageStats("dedup")
    total.n_in, total.kept, total.dropped = ex["in"], ex["kept"], dict(ex["dropped"])
    total.per_task = {
        t: {"in": v["in"], "kept": v["kept"], "dropped": dict(v["dropped"])} for t, v in ex["per_task"].items()
    }
    extra = {"method": "exact", "partitions": len(exact_stats), **(params or {})}
    if near_stats:
        nr = merge_stats(near_stats, stage="dedup")
        if nr["in"] != ex["kept"]:
            raise ValueError(f"near-dup filter read {nr['in']} records, the exact step kept {ex['kept']}")
        total.kept = nr["kept"]
        for reason, n in nr["dropped"].items():
            total.dropped[reason] = total.dropped.get(reason, 0) + n
        for task, v in nr["per_task"].items():
            mine = total.per_task[task]
            if v["in"] != mine["kept"]:
                raise ValueError(
                    f"task {task}: near-dup filter read {v['in']} records, the exact step kept {mine['kept']}"
                )
            mine["kept"] = v["kept"]
            for reason, n in v["dropped"].items():
                mine["dropped"][reason] = mine["dropped"].get(reason, 0) + n
        missing = [t for t, v in total.per_task.items() if v["kept"] and t not in nr["per_task"]]
        if missing:
            raise ValueError(f"near-dup filter read no records of tasks {missing}, which the exact step kept")
        extra["method"] = "exact+near"
        if components:
            comp = read_json(components)
            extra.update({k: comp[k] for k in ("pairs", "clusters", "clustered_records") if k in comp})
            found = {}
            for path in near_stats:
                found.update(read_json(path).get("example_records", {}))
            extra["near_duplicate_examples"] = [
                {
                    "dropped": found[str(d)]["query"],
                    "kept": found[str(k)]["query"],
                    "task": found[str(d)]["task"],
                    "dropped_id": d,
                    "kept_id": k,
                }
                for d, k in comp.get("examples", [])
                if str(d) in found and str(k) in found
            ]
    total.check()
    out = total.as_dict()
    out.update(extra, seconds=round(ex["seconds"] + (merge_stats(near_stats)["seconds"] if near_stats else 0.0), 3))
    write_json(out_path, out)
    return out


# ---- everything in one process (by hand, the benchmark) ----------------------------------------


def _as_part(path: str, ordinal: int, workdir: Path) -> str:
    """``path`` as a Parquet part with ids: as is when it has them, else converted (id = input order)."""
    p = Path(path)
    if p.suffix == ".parquet" and "id" in pq.ParquetFile(p).schema_arrow.names:
        table = pq.read_table(p, columns=["id"])
        if not table.column("id").null_count:
            return path
    out = workdir / f"in{ordinal}.parquet"

    def records():
        for row, rec in enumerate(iter_shard(p)):
            if "id" not in rec:
                rec = {**rec, "id": record_id(ordinal, row)}
            yield rec

    write_shard(out, records())
    return str(out)


def dedup_local(
    inputs: list[str],
    out_path: str,
    stats_path: str,
    partitions: int = 1,
    near: bool = False,
    band_jobs: int = 1,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 5,
    seed: int = 1,
    workdir: str | None = None,
    batch: int | None = None,
) -> dict:
    """Every step of the stage in this process (in the workflow each is a job of its own): scatter
    each input, exact dedup per partition, then (``near``) minhash per partition, the LSH bucket
    jobs, components, filter per partition; the output is one file in input order."""
    from kalm.data import near_dedup as nd

    own = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix=".dedup.", dir=Path(out_path).parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parts = [_as_part(p, i, work) for i, p in enumerate(inputs)]
        scatter = [str(work / f"scatter{i}.arrow") for i in range(len(parts))]
        for part, out in zip(parts, scatter):
            scatter_parts([part], out, partitions)
        exact = [str(work / f"exact.p{j}.parquet") for j in range(partitions)]
        exact_stats = [str(work / f"exact.p{j}.stats.json") for j in range(partitions)]
        for j in range(partitions):
            dedup_partition(scatter, j, partitions, exact[j], exact_stats[j])
        final, near_stats, comp = exact, None, None
        params = {}
        if near:
            mh = [str(work / f"minhash.p{j}") for j in range(partitions)]
            for j in range(partitions):
                nd.minhash_partition(
                    exact[j], mh[j], num_perm, shingle, seed, threshold, **({"batch": batch} if batch else {})
                )
            pairs = [str(work / f"pairs{k}.npy") for k in range(band_jobs)]
            for k in range(band_jobs):
                nd.bucket_pairs(mh, pairs[k], k, band_jobs, threshold)
            comp = str(work / "components.json")
            nd.near_components(pairs, str(work / "drop.npy"), comp)
            final = [str(work / f"dedup.p{j}.parquet") for j in range(partitions)]
            near_stats = [str(work / f"dedup.p{j}.stats.json") for j in range(partitions)]
            for j in range(partitions):
                nd.near_filter(exact[j], str(work / "drop.npy"), final[j], near_stats[j], comp, partition=f"p{j}")
            params = {
                "threshold": threshold,
                "num_perm": num_perm,
                "shingle": shingle,
                "seed": seed,
                "band_jobs": band_jobs,
            }
        stats = gather_stats(exact_stats, stats_path, near_stats, comp, params)
        stats_inputs = {"inputs": list(inputs)}
        records = iter_output(final)
        if str(out_path).endswith(".jsonl"):
            from kalm.io import write_jsonl

            write_jsonl(out_path, records)
        else:
            write_shard(out_path, records)
        stats.update(stats_inputs)
        write_json(stats_path, stats)
        return stats
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def iter_output(paths: Iterable[str]) -> Iterator[dict]:
    """The records of a stage's dedup partitions (``dedup_parts``) in input (id) order, streamed."""
    return heapq.merge(*(iter_shard(p) for p in paths), key=lambda r: r["id"])


# ---- command line --------------------------------------------------------------------------------

STEPS = ["run", "scatter", "exact", "minhash", "buckets", "components", "filter", "stats"]


def _need(args, *names) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise SystemExit(f"kalm dedup --step {args.step}: {', '.join(missing)} required")


def _run(args: argparse.Namespace) -> None:
    from kalm.data import near_dedup as nd

    step = args.step
    ins = args.inputs
    base = json.loads(args.options) if args.options else {}
    c = options.from_args(DedupConfig, args, base)
    threshold_given = hasattr(args, "threshold") or "threshold" in base  # buckets: else the minhash step's
    if step in ("minhash", "filter") and len(ins) != 1:
        raise SystemExit(f"kalm dedup --step {step}: exactly one input partition")
    _need(args, "out")
    outs = args.out
    if len(outs) != 1:
        raise SystemExit(f"kalm dedup --step {step}: one --out (the inputs go before the options)")
    out = outs[0]
    if step == "run":
        _need(args, "stats")
        dedup_local(
            ins,
            out,
            args.stats,
            c.shards,
            c.near_dup,
            c.band_jobs,
            c.threshold,
            c.num_perm,
            c.shingle,
            c.seed,
        )
    elif step == "scatter":
        scatter_parts(ins, out, c.shards)
    elif step == "exact":
        _need(args, "stats", "partition")
        dedup_partition(ins, partition_index(args.partition), c.shards, out, args.stats)
    elif step == "minhash":
        nd.minhash_partition(ins[0], out, c.num_perm, c.shingle, c.seed, c.threshold)
    elif step == "buckets":
        nd.bucket_pairs(ins, out, args.band_job, c.band_jobs, c.threshold if threshold_given else None, c.bucket_chunk)
    elif step == "components":
        nd.near_components(ins, out, args.stats or str(Path(out).with_suffix(".json")))
    elif step == "filter":
        _need(args, "stats", "drop")
        nd.near_filter(ins[0], args.drop, out, args.stats, args.components, args.partition)
    elif step == "stats":
        params = json.loads(args.params) if args.params else None
        gather_stats(ins, out, args.near_stats, args.components, params)


def register(sub) -> None:
    p = sub.add_parser(
        "dedup",
        help="drop exact (and near-) duplicates across a stage: one step at a time, or all at once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Steps of the sharded dedup stage (workflow/rules/dedup.smk runs each as jobs):
  run (default)  IN... --out FILE.jsonl|.parquet --stats S [--near-dup --shards P --band-jobs K]
                 every step in this process
  scatter        PART... --shards P --out SCATTER.arrow  validated parts (in input order) to one file of P
                                                     partitions
  exact          SCATTER... --shards P --partition pJ --out EXACT_J --stats S
                                                     partition J of every scatter file
  minhash        EXACT_j --out DIR                   signatures, ids, sorted band keys (.npy)
  buckets        DIR... --band-job k --band-jobs K --out PAIRS_k.npy   every partition's minhash DIR
  components     PAIRS... --out drop.npy --stats components.json
  filter         EXACT_j --drop drop.npy --components components.json --out DEDUP_j --stats S
  stats          EXACT_STATS... [--near-stats ... --components C] --params JSON --out dedup.stats.json
Inputs go before the options (--out, like the inputs, takes a list).""",
    )
    p.add_argument("inputs", nargs="+", help="the step's inputs (see the description)")
    p.add_argument("--step", choices=STEPS, default="run")
    p.add_argument("--out", nargs="+", help="the step's output file")
    p.add_argument("--stats", help="stats JSON of the step")
    p.add_argument("--band-job", type=int, default=0, help="buckets: which of the --band-jobs this is (0-based)")
    p.add_argument("--options", help="the config's data.dedup section as JSON (DedupConfig's keys); flags win")
    options.add_arguments(p, DedupConfig)
    p.add_argument("--drop", help="filter: the components step's drop.npy")
    p.add_argument("--components", help="filter, stats: the components step's stats JSON (examples)")
    p.add_argument("--near-stats", nargs="+", help="stats: the filter step's partition stats")
    p.add_argument("--partition", help="exact, filter: the partition, pJ (exact reads partition J; both name it so)")
    p.add_argument("--params", help="stats: JSON object of settings to record in the stats")
    p.set_defaults(func=_run)
