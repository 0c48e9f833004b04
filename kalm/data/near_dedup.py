"""Near-duplicate removal across a stage as band-partitioned LSH: minhash, buckets, components, filter.

Runs on the partitions of the exact step (``kalm.data.dedup``), each a Parquet file of records in ``id``
(input) order. Each step is a Snakemake job (``workflow/rules/dedup.smk``) whose memory depends on
its own shard, never on the corpus:

1. ``minhash_partition`` (one job per partition): the MinHash signature of each record's text
   (normalised query and sorted positives, :func:`record_text`) to ``sig.npy`` (``uint32[n,
   num_perm]``), the records' ids to ``ids.npy``, and for each of the ``bands x rows`` LSH bands
   (``kalm.data.minhash.optimal_bands``) the band keys sorted, ``keys.npy`` (``uint64[bands, n]``), with
   the row each key belongs to, ``rows.npy``. Memory: a batch of texts, then one band's keys and
   their sort order (24 bytes a record of the partition); the arrays are memory-mapped files.
2. ``bucket_pairs`` (``band_jobs`` jobs, each owning a contiguous range of bands): for each of its
   bands, the records of every partition that share the band key (a bucket) are grouped -- the
   sorted keys are cut into key ranges of about ``chunk_records`` records (a bucket is never cut)
   and each range is read from every partition's memory-mapped ``keys.npy``, so memory is one range,
   not the corpus (a single bucket larger than ``chunk_records`` is held whole). In a bucket, the records (by id) are linked to earlier ones whose estimated
   Jaccard similarity (``kalm.data.minhash.similarity``) is >= ``threshold``: enough verified pairs
   ``(id_a, id_b)`` to connect what the bucket's all-pairs similarity graph connects (each record
   is compared with the first record of each group so far, then with the other members of the
   groups it did not match). Output: the pairs, ``int64[m, 2]`` ``.npy``.
3. ``near_components`` (one job): connected components of the pairs (a vectorised union-find over
   the ids that occur in a pair: memory is proportional to the pairs, not to the records). Every
   member of a component except its smallest id is dropped: ``drop.npy`` (``int64[d, 2]``: dropped
   id, the id kept for its cluster; sorted), and stats (pairs, clusters, a few examples).
4. ``near_filter`` (one job per partition): streams the partition and drops those ids
   (``near_duplicate``), counted per task; the stage's ``dedup.stats.json`` is the gather of the
   exact and filter stats (``kalm.data.dedup.gather_stats``).

Semantics (changed from the single-job version, which was greedy): a record is dropped when it is
connected, through a chain of verified LSH candidate pairs, to a record with a smaller id; the
smallest id of each cluster is kept -- the connected-components semantics of datatrove and NeMo
Curator (which do not verify candidates; we do). The greedy version dropped a record only when an
earlier *kept* record in a shared band was similar, so in a chain A ~ B ~ C with A and C not
similar it kept A and C; now only A stays. A record with no similar record is never dropped, the
result does not depend on the number of partitions or band jobs (tests/test_dedup_shuffle.py), and
running the step on its own output drops nothing (two kept records are never a verified pair).

Library choice (datasketch, rensa, or this): see ``kalm.data.minhash`` and docs/benchmarks.md, "Near-dup library choice".
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from kalm.data.dedup import (
    TableWriter,
    add_counts,
    conform,
    ids_of,
    in_sorted,
    iter_tables,
    sorted_unique,
    task_counts,
)
from kalm.data.minhash import band_keys, optimal_bands, signatures
from kalm.data.shards import count_rows
from kalm.io import StageStats, atomic_path, read_json, release_pages, write_json
from kalm.text import dedup_key

log = logging.getLogger(__name__)

BATCH = 4096
N_EXAMPLES = 5
CHUNK_RECORDS = 1 << 22


def record_text(rec: dict) -> str:
    """The text whose shingles represent a training record: query and sorted positives, joined by a
    newline and normalised as one string (``dedup_key``: NFKC, whitespace folded, case-folded)."""
    return dedup_key("\n".join([rec["query"], *sorted(rec["pos"])]))


def _batches(it: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(it, size)):
        yield batch


# ---- in memory: verified pairs of a bucket, components ------------------------------------------


def _group_edges(g: np.ndarray, ids: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Verified pairs connecting the all-pairs similarity graph of one bucket (``g``: signatures of
    its members in id order). Group by group: each member is compared with the first member of
    every group so far, then with the other members of the groups it did not match."""
    groups: list[list[int]] = []
    edges = []
    for i in range(len(g)):
        matched = []  # (group index, member it matched)
        if groups:
            reps = np.fromiter((c[0] for c in groups), dtype=np.int64, count=len(groups))
            hit = (g[reps] == g[i]).mean(axis=1) >= threshold
            matched = [(c, groups[c][0]) for c in np.flatnonzero(hit)]
            rest = [c for c in np.flatnonzero(~hit) if len(groups[c]) > 1]
            if rest:
                members = np.fromiter(itertools.chain.from_iterable(groups[c][1:] for c in rest), dtype=np.int64)
                owner = np.repeat(rest, [len(groups[c]) - 1 for c in rest])
                ok = (g[members] == g[i]).mean(axis=1) >= threshold
                first = {}
                for c, m in zip(owner[ok], members[ok]):
                    first.setdefault(int(c), int(m))
                matched += sorted(first.items())
        edges += [(int(ids[m]), int(ids[i])) for _, m in matched]
        if not matched:
            groups.append([i])
            continue
        merged = sorted(itertools.chain([i], *(groups[c] for c, _ in matched)))
        drop = {c for c, _ in matched}
        groups = [c for k, c in enumerate(groups) if k not in drop] + [merged]
    return edges


def verified_pairs(
    keys: np.ndarray, ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray], threshold: float
) -> np.ndarray:
    """The verified pairs ``int64[m, 2]`` (smaller id first) of one band: records with equal keys
    form a bucket; ``fetch(index array)`` returns the signatures of those records."""
    keys, ids = np.asarray(keys), np.asarray(ids)
    empty = np.empty((0, 2), dtype=np.int64)
    if len(keys) < 2:
        return empty
    sk = np.sort(keys)
    dup = sorted_unique(sk[1:][sk[1:] == sk[:-1]])
    del sk
    if not len(dup):
        return empty
    sel = np.flatnonzero(in_sorted(keys, dup))
    order = sel[np.lexsort((ids[sel], keys[sel]))]
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, len(k)])
    sigs = fetch(order)
    out = []
    two = starts[sizes == 2]
    if len(two):
        sim = (sigs[two] == sigs[two + 1]).mean(axis=1)
        ok = sim >= threshold
        out.append(np.stack([ids[order[two[ok]]], ids[order[two[ok] + 1]]], axis=1))
    for s, n in zip(starts[sizes > 2], sizes[sizes > 2]):
        edges = _group_edges(sigs[s : s + n], ids[order[s : s + n]], threshold)
        if edges:
            out.append(np.asarray(edges, dtype=np.int64))
    return np.concatenate(out).astype(np.int64) if out else empty


def unique_pairs(pairs: list[np.ndarray]) -> np.ndarray:
    pairs = [p for p in pairs if len(p)]
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root): the ids occurring in ``pairs`` (sorted) and the smallest id of each one's
    connected component. A vectorised union-find: each round hooks the larger root of every
    unsatisfied pair under the smaller one, then compresses paths; memory ~ the pairs."""
    nodes = sorted_unique(pairs) if len(pairs) else np.empty(0, dtype=np.int64)
    if not len(nodes):
        return nodes, nodes.copy()
    a, b = np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1])
    parent = np.arange(len(nodes))
    while True:
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            break
        lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, hi, lo)
        while True:  # path compression: every node points at its root
            grand = parent[parent]
            if (grand == parent).all():
                break
            parent = grand
    return nodes, nodes[parent]


def near_duplicates(sigs: np.ndarray, threshold: float, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """In memory, for signatures in input order: (keep mask, index of the record kept for each
    dropped record's cluster, -1 if kept). The same semantics as the sharded steps."""
    n, num_perm = sigs.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    match = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return keep, match
    bands, rows = optimal_bands(threshold, num_perm)
    keys = band_keys(sigs, bands, rows)
    pairs = unique_pairs([verified_pairs(keys[:, b], ids, lambda idx: sigs[idx], threshold) for b in range(bands)])
    nodes, root = components(pairs)
    dropped = nodes != root
    pos = np.argsort(ids)
    where = pos[np.searchsorted(ids, nodes[dropped], sorter=pos)]
    keep[where] = False
    match[where] = pos[np.searchsorted(ids, root[dropped], sorter=pos)]
    return keep, match


# ---- step 1: minhash of one partition -------------------------------------------------------------


def minhash_partition(
    input_path: str,
    out_dir: str,
    num_perm: int = 128,
    shingle: int = 5,
    seed: int = 1,
    threshold: float = 0.8,
    batch: int = BATCH,
) -> int:
    """Signatures, ids and sorted band keys of one partition's records into the folder ``out_dir``;
    return the record count."""
    n = count_rows(input_path)
    bands, rows = optimal_bands(threshold, num_perm)
    row_dtype = np.int32 if n < 2**31 else np.int64
    with atomic_path(out_dir, is_dir=True) as tmp:
        sigs = np.lib.format.open_memmap(tmp / "sig.npy", mode="w+", dtype=np.uint32, shape=(n, num_perm))
        ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.int64, shape=(n,))
        keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.uint64, shape=(bands, n))
        i = 0
        for table in iter_tables(input_path, columns=["id", "query", "pos"], batch_rows=batch):
            texts = [
                record_text({"query": q, "pos": p})
                for q, p in zip(table.column("query").to_pylist(), table.column("pos").to_pylist())
            ]
            s = signatures(texts, num_perm, shingle, seed)
            m = len(texts)
            sigs[i : i + m], ids[i : i + m] = s, ids_of(table)
            keys[:, i : i + m] = band_keys(s, bands, rows).T
            i += m
            if i // (25 * batch) != (i - m) // (25 * batch):
                log.info("minhash %s: %d / %d records", input_path, i, n)
        if i != n:
            raise RuntimeError(f"{input_path}: counted {n} records but read {i}")
        order_rows = np.lib.format.open_memmap(tmp / "rows.npy", mode="w+", dtype=row_dtype, shape=(bands, n))
        for b in range(bands):  # one band in memory at a time
            k = np.array(keys[b])
            order = np.argsort(k, kind="stable")
            keys[b], order_rows[b] = k[order], order
            del k, order
        for arr in (sigs, ids, keys, order_rows):
            arr.flush()
        del sigs, ids, keys, order_rows
        write_json(
            tmp / "meta.json",
            {
                "records": n,
                "num_perm": num_perm,
                "shingle": shingle,
                "seed": seed,
                "threshold": threshold,
                "bands": bands,
                "rows": rows,
            },
        )
    log.info("minhash %s: %d records, %d bands x %d rows", input_path, n, bands, rows)
    return n


class _Partition:
    """A minhash folder, memory-mapped."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.meta = read_json(self.path / "meta.json")
        self.sig = np.load(self.path / "sig.npy", mmap_mode="r")
        self.ids = np.load(self.path / "ids.npy", mmap_mode="r")
        self.keys = np.load(self.path / "keys.npy", mmap_mode="r")
        self.rows = np.load(self.path / "rows.npy", mmap_mode="r")


def band_range(bands: int, band_job: int, band_jobs: int) -> range:
    """The bands of bucket job ``band_job`` of ``band_jobs``: contiguous, as even as can be."""
    if not 0 <= band_job < band_jobs:
        raise ValueError(f"band job {band_job} is not in 0..{band_jobs - 1}")
    lo, hi = bands * band_job // band_jobs, bands * (band_job + 1) // band_jobs
    return range(lo, hi)


def _key_ranges(parts: list[_Partition], band: int, chunk: int) -> list[tuple[int | None, int | None]]:
    """Key ranges ``[lo, hi)`` of about ``chunk`` records of one band over all partitions (from a
    sample of every partition's sorted keys); equal keys never straddle two ranges."""
    total = sum(len(p.ids) for p in parts)
    n_ranges = math.ceil(total / chunk) if total else 1
    if n_ranges <= 1:
        return [(None, None)]
    stride = max(1, total // (64 * n_ranges))
    sample = np.sort(np.concatenate([np.asarray(p.keys[band, ::stride]) for p in parts]))
    cuts = np.unique(sample[np.linspace(0, len(sample) - 1, n_ranges + 1).astype(np.int64)[1:-1]])
    bounds = [None, *(int(c) for c in cuts), None]
    return list(zip(bounds[:-1], bounds[1:]))


def bucket_pairs(
    minhash_dirs: list[str],
    out_path: str,
    band_job: int = 0,
    band_jobs: int = 1,
    threshold: float | None = None,
    chunk_records: int = CHUNK_RECORDS,
) -> int:
    """Verified candidate pairs of the bands of one bucket job, over every partition; return how many."""
    parts = [_Partition(p) for p in minhash_dirs]
    if not parts:
        raise ValueError("buckets: no minhash partitions")
    meta = parts[0].meta
    for p in parts[1:]:
        for k in ("num_perm", "shingle", "seed", "bands", "rows"):
            if p.meta[k] != meta[k]:
                raise ValueError(f"{p.path}: {k} {p.meta[k]} differs from {parts[0].path}'s {meta[k]}")
    threshold = meta["threshold"] if threshold is None else threshold
    found = []
    my_bands = band_range(meta["bands"], band_job, band_jobs)
    for band in my_bands:
        for lo_key, hi_key in _key_ranges(parts, band, chunk_records):
            keys, part_of, rows = [], [], []
            for j, p in enumerate(parts):
                kb = p.keys[band]
                lo = 0 if lo_key is None else int(np.searchsorted(kb, np.uint64(lo_key)))
                hi = len(kb) if hi_key is None else int(np.searchsorted(kb, np.uint64(hi_key)))
                keys.append(np.asarray(kb[lo:hi]))
                rows.append(np.asarray(p.rows[band, lo:hi], dtype=np.int64))
                part_of.append(np.full(hi - lo, j, dtype=np.int32))
                release_pages(p.keys, p.rows)  # copied: one partition's pages in this process at a time
            keys, rows, part_of = np.concatenate(keys), np.concatenate(rows), np.concatenate(part_of)
            sk = np.sort(keys)
            shared = in_sorted(keys, sorted_unique(sk[1:][sk[1:] == sk[:-1]]))  # records in a bucket of 2+
            del sk
            keys, rows, part_of = keys[shared], rows[shared], part_of[shared]
            # part_of is sorted (partition by partition): each partition's records are one slice
            cut = np.searchsorted(part_of, np.arange(len(parts) + 1))
            ids = np.empty(len(keys), dtype=np.int64)
            for j in np.flatnonzero(np.diff(cut)):  # their ids (memory-mapped reads)
                ids[cut[j] : cut[j + 1]] = parts[j].ids[rows[cut[j] : cut[j + 1]]]
                release_pages(parts[j].ids)

            def fetch(idx, rows=rows, part_of=part_of):
                """Signatures of records ``idx`` (read partition by partition, rows ascending)."""
                out = np.empty((len(idx), meta["num_perm"]), dtype=np.uint32)
                order = np.lexsort((rows[idx], part_of[idx]))
                src = idx[order]
                bounds = np.searchsorted(part_of[src], np.arange(len(parts) + 1))
                for j in np.flatnonzero(np.diff(bounds)):
                    sel = order[bounds[j] : bounds[j + 1]]
                    out[sel] = parts[j].sig[rows[src[bounds[j] : bounds[j + 1]]]]
                    release_pages(parts[j].sig)  # scattered rows map their neighbours too: unmap them
                return out

            found.append(verified_pairs(keys, ids, fetch, threshold))
    pairs = unique_pairs(found)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pairs)
    log.info(
        "buckets %d/%d (bands %d-%d of %d): %d verified pairs",
        band_job,
        band_jobs,
        my_bands.start,
        my_bands.stop - 1,
        meta["bands"],
        len(pairs),
    )
    return len(pairs)


# ---- step 3: components ---------------------------------------------------------------------------


def near_components(pair_paths: list[str], drop_path: str, stats_path: str, n_examples: int = N_EXAMPLES) -> dict:
    """Connected components of every bucket job's pairs: the ids to drop (all but the smallest of
    each component) to ``drop_path`` as ``int64[d, 2]`` (dropped id, kept id; sorted), and stats."""
    pairs = unique_pairs([np.load(p) for p in pair_paths])
    nodes, root = components(pairs)
    dropped = nodes != root
    drop = np.stack([nodes[dropped], root[dropped]], axis=1).astype(np.int64)
    with atomic_path(drop_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, drop)
    stats = {
        "pairs": int(len(pairs)),
        "clusters": int(len(np.unique(root))),
        "clustered_records": int(len(nodes)),
        "near_duplicate": int(len(drop)),
        "band_jobs": len(pair_paths),
        "examples": [[int(d), int(k)] for d, k in drop[:n_examples]],
    }
    write_json(stats_path, stats)
    log.info("components: %d pairs, %d clusters, %d records to drop", stats["pairs"], stats["clusters"], len(drop))
    return stats


# ---- step 4: filter one partition -----------------------------------------------------------------


def near_filter(
    input_path: str,
    drop_path: str,
    out_path: str,
    stats_path: str,
    components_stats: str | None = None,
    partition: str | None = None,
) -> StageStats:
    """Drop the components step's ids from one exact partition (streamed); stats per task, and the
    query of each example id found here (for the gather's ``near_duplicate_examples``)."""
    drop = np.load(drop_path, mmap_mode="r")
    drop_ids = np.asarray(drop[:, 0]) if len(drop) else np.empty(0, dtype=np.int64)
    wanted = set()
    if components_stats:
        wanted = {int(i) for pair in read_json(components_stats).get("examples", []) for i in pair}
    stats = StageStats("dedup", method="near", **({"partition": partition} if partition is not None else {}))
    seen, kept = Counter(), Counter()
    examples = {}
    with TableWriter(out_path) as out:
        for table in iter_tables(input_path):
            ids = ids_of(table)
            keep = ~in_sorted(ids, drop_ids)
            seen += task_counts(table)
            kept += task_counts(table, keep)
            if wanted:
                for row in np.flatnonzero(np.isin(ids, list(wanted))):
                    examples[str(int(ids[row]))] = {
                        "query": table.column("query")[int(row)].as_py(),
                        "task": table.column("task")[int(row)].as_py(),
                    }
            out.write(conform(table.filter(pa.array(keep))))
    add_counts(stats, seen, kept, "near_duplicate")
    stats.extra["example_records"] = examples
    stats.write(stats_path)
    log.info("near filter %s: %d in, %d kept", out_path, stats.n_in, stats.kept)
    return stats
