"""FAISS hard-negative mining with ranking-consistency filtering (KaLM / FlagEmbedding hn_mine).

The candidate pool is the set of passages (positives and given negatives) of a task
(``pool="task"``, the default: negatives of the same kind as the positive) or of all mined
tasks together (``pool="global"``). Each query is searched against its pool (inner product
on L2-normalised embeddings = cosine; queries in batches), and then:

1. ranking-consistency filter (``filter_topk``): the record is dropped when its best positive
   scores below the candidate at 0-based rank ``filter_topk`` of the raw retrieval list, i.e.
   when more than ``filter_topk`` pool passages outrank it (the positive itself is in the pool,
   so it may sit at 1-based rank ``filter_topk + 1`` at worst): the retriever disagrees with the
   label, so the pair is likely noisy (KaLM V1, section 3.2). This is the test of KaLM's
   ``train/hn_mine.py`` (HITsz-TMG/KaLM-Embedding: ``pos_score < all_p_scores[filter_topk]``,
   applied when the pool has more than ``filter_topk`` passages). One difference: KaLM searches
   only ``range_for_sampling[1]`` candidates, so there a ``filter_topk`` >= that bound silently
   disables the filter; here the search is widened to ``filter_topk + 1`` so the filter applies;
2. given negatives (the record's own ``neg``: NLI contradictions, BM25 negatives, ...):
   ``given_negatives="keep"`` (the default, as KaLM's hn_mine) keeps them first, at most
   ``negative_number`` of them (the first ones; the rest is counted as truncated), after
   dropping those whose normalised text equals a positive, the query or an earlier given
   negative (counted); mining then only fills up to ``negative_number``.
   ``given_negatives="replace"`` discards them (counted) and mines all ``negative_number``
   (FlagEmbedding's ``scripts/hn_mine.py``). Either way they stay in the candidate pool;
3. candidates are taken from the rank window ``[lo, hi)`` (0-based ranks of the raw
   retrieval list, as hn_mine's ``range_for_sampling``), removing
   - candidates whose normalised text equals a positive or the query (counted), and in keep
     mode those equal to a kept given negative (counted), and those equal to a better-ranked
     candidate (``candidates_repeated``; the pool holds distinct encoder-side texts, which can
     share a normalised text): a record's negatives are distinct,
   - with ``margin_ratio``, candidates scoring above ``margin_ratio`` x the positive score
     (NV-Retriever's TopK-PercPos, arXiv 2407.15831: likely false negatives; counted). With
     several positives the lowest positive score is used, and the threshold is written
     ``s - |s|(1 - ratio)`` so that it also behaves for negative positive scores;
4. the missing negatives are sampled from what is left (``sampling="top"`` takes the
   best-ranked instead: then the candidate lists equal sentence-transformers'
   ``mine_hard_negatives(..., sampling_strategy="top")``, a test);
5. when fewer survive, the rest is padded with random pool passages (``pad="random"``, never
   a positive, the query or a kept given negative) or left short (``pad="none"``); both are
   counted.

Mined records keep their fields and gain ``neg`` (kept given negatives first, then mined ones,
then random pads), ``neg_ranks`` (the 0-based retrieval rank of a mined negative; -1 marks a
random pad, -2 a given negative), ``neg_scores`` (every negative's score against the query,
given ones included) and ``pos_score``. Records of tasks that are not mined (e.g.
classification with given label negatives) pass through unchanged. The stats JSON holds the
funnel; over the mined records that pass the filter, ``given_negatives_seen`` = ``_kept`` +
``_equal_to_positive_or_query`` + ``_duplicate`` + ``_truncated`` (keep) or ``_replaced``
(replace), and the negatives written = ``given_negatives_kept`` + ``negatives_from_window`` +
``negatives_padded_random``.

Index (``index``): ``flat`` (exact, float32, BLAS), ``flat_fp16`` (exact on our float16
embeddings, half the memory), ``ivf`` (IVF-Flat, ``nlist`` / ``nprobe``) or ``hnsw``
(``hnsw_m`` / ``ef_search``) for corpora too large for exact search. With faiss-gpu and a
visible GPU, flat and IVF indexes run on the GPUs (exact results equal the CPU's).
Memory: the embeddings stay memory-mapped float16; only the pool's vectors are converted,
chunk by chunk, into the index (see docs/mining.md, "Memory bound").

Sharded (the workflow, issue 15): ``--step pool`` builds each candidate pool once (one job per pool:
a mined task, or ``global``) from all records: its passages sorted by encoder-side text (each with the
raw text of its first occurrence in input order), their key hashes, their vectors and, for ``ivf`` /
``hnsw``, the index trained and filled once (``faiss.write_index``; a flat index is a copy of the
vectors, rebuilt in each job instead of stored twice). ``--step apply`` mines one query shard: its own
records, task by task, against their task's whole pool; ``--step merge`` adds up the shards' stats.
``--step all`` (the default) runs the three in one process through a temporary folder.

Sampling RNG (changed with the sharding): each record's draws (window sample, random pads) come from
``random.Random(f"{seed}:{id}")``, the record's id (``kalm.data.shards.record_id``, input order), instead of
its place among its task's records in the one input file; and the pool's row order is the sorted
encoder-side texts instead of first-seen order. So a record gets the same negatives whichever query
shard mines it and wherever it sits in the shard: mining with 1 or 3 query shards writes the same
records (tests/test_sharded_stages.py). Records without an id (hand-made JSON Lines) keep the old seed
``f"{seed}:{task}:{place}"``. For the same data and seed the negatives differ from earlier versions.
Scores, for the same reason: FAISS only *finds* the candidates (``RESCORE_EXTRA`` more than needed);
every score that decides something (the retrieval ranks, the filter, the margin) and every score
written is then computed by :func:`exact_scores`, whose bits do not depend on the batch a query is
searched in, and near-ties are broken by pool row. (Measured on the demo corpus before this, one vs two
query shards: 1 of 4,198 filter verdicts and the negatives of 272 of 3,576 records differed, mostly in
retrieval_zh, whose texts the English base model embeds almost alike: FAISS's order among near-equal
scores depended on the batch.)
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kalm import options
from kalm.data.dedup import sorted_unique
from kalm.data.shards import record_writer
from kalm.io import StageStats, atomic_path, merge_stats, read_json, read_rows, release_pages, write_json
from kalm.mining.config import GIVEN_NEGATIVES, INDEX_TYPES, POOLS, MineConfig
from kalm.mining.embed import ShardedEmbeddings, mining_texts, text_digest
from kalm.text import dedup_key

log = logging.getLogger(__name__)

PAD_RANK = -1  # neg_ranks marker: a random pad
GIVEN_RANK = -2  # neg_ranks marker: a negative the record came with (given_negatives="keep")
GPU_MAX_K = 2048  # faiss-gpu's largest k
GLOBAL_POOL = "global"  # the pool folder of pool="global"


@dataclass
class IndexConfig:
    type: str = "flat"
    nlist: int | None = None  # ivf: None = the pool's distinct passages / list_size
    nprobe: int = 32
    list_size: int = 256  # ivf: passages per list when nlist is None
    scan_mib: float = 256  # ivf: MiB of merged lists per piece (written and scanned one piece at a time)
    hnsw_m: int = 32
    ef_search: int = 256
    ef_construction: int = 80
    use_gpu: bool | None = None  # None: when faiss-gpu sees a GPU


def _num_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index, cfg: IndexConfig, k: int):
    """``index`` on every visible GPU (faiss-gpu; flat and IVF, k <= GPU_MAX_K), else unchanged."""
    import faiss

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else _num_gpus() > 0
    if use_gpu and cfg.type != "hnsw" and k <= GPU_MAX_K:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = cfg.type == "flat_fp16"
        options.shard = True  # split the database across GPUs (memory), merge results
        return faiss.index_cpu_to_all_gpus(index, co=options)
    if use_gpu:
        log.info("index %s with k=%d stays on CPU (faiss-gpu: no HNSW, k <= %d)", cfg.type, k, GPU_MAX_K)
    return index


def build_index(
    vectors: np.ndarray | ShardedEmbeddings,
    cfg: IndexConfig | None = None,
    texts=None,
    k: int = 100,
    add_chunk: int = 65536,
    gpu: bool = True,
):
    """An inner-product index over ``vectors`` (or over ``texts`` of a sharded store), added in chunks;
    ``gpu=False`` keeps it on the CPU (to be written with faiss.write_index)."""
    import faiss

    cfg = cfg or IndexConfig()
    if cfg.type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {INDEX_TYPES}, not {cfg.type!r}")
    n = len(texts) if texts is not None else len(vectors)
    dim = vectors.dim if isinstance(vectors, ShardedEmbeddings) else vectors.shape[1]

    def chunk(start, stop):
        if texts is not None:
            return vectors.vectors(texts[start:stop])
        return np.ascontiguousarray(vectors[start:stop], dtype=np.float32)

    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.type == "flat_fp16":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip)
    elif cfg.type == "ivf":
        nlist = max(1, min(cfg.nlist or round(n / cfg.list_size), n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
        train_n = min(n, 64 * nlist)  # faiss wants >= 39 points per centroid; 64 is plenty
        sample = np.sort(np.random.default_rng(0).choice(n, train_n, replace=False))
        train = (
            vectors.vectors([texts[i] for i in sample])
            if texts is not None
            else np.ascontiguousarray(vectors[sample], dtype=np.float32)
        )
        index.train(train)
        index.nprobe = min(cfg.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = max(cfg.ef_search, k)
    if gpu:
        index = to_gpu(index, cfg, k)
    for start in range(0, n, add_chunk):
        index.add(chunk(start, start + add_chunk))
    return index


def key_hash(text: str) -> int:
    """A passage's identity for "the same text" checks: a 64-bit hash of its normalised text (dedup_key)
    as a signed int64 (a collision, ~n^2 / 2^65 for a pool of n, would only ban one candidate)."""
    return int.from_bytes(
        hashlib.blake2b(dedup_key(text).encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True
    )


TEXTS_FILE = "texts.arrow"  # a pool shard's texts: Arrow IPC, uncompressed, so that mining memory-maps it


def write_texts(path: Path, texts: list[str], raw: list[str], batch: int = 65536) -> None:
    """A pool shard's encoder-side and raw texts as an Arrow IPC file (large strings: no 2 GiB limit)."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.large_string()), ("raw", pa.large_string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(texts), batch):
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(texts[start : start + batch], pa.large_string()),
                        pa.array(raw[start : start + batch], pa.large_string()),
                    ],
                    schema=schema,
                )
            )


def read_texts(path: Path, column: str = "raw"):
    """A column of :func:`write_texts`'s file, memory-mapped (file-backed pages, no copy)."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path))).read_all().column(column)


class PoolBuilder:
    """Collects a pool's candidate passages: each distinct encoder-side text once, with the raw text
    of its first occurrence in input order (smallest record id, then place in the record)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple, str]] = {}

    def add(self, formatted: str, raw: str, order: tuple) -> None:
        old = self.entries.get(formatted)
        if old is None or order < old[0]:
            self.entries[formatted] = (order, raw)

    def save(
        self,
        folder: str | Path,
        store: ShardedEmbeddings | None,
        embeddings: list[str] | None = None,
        index_cfg: IndexConfig | None = None,
        k: int = 100,
        name: str = "",
        chunk: int = 65536,
        quantizer: Path | None = None,
        shard: int = 0,
    ) -> int:
        """Write the pool to ``folder``: its passages sorted by encoder-side text (so the pool, its row
        numbers and everything drawn from them are the same whatever the sharding), their key hashes,
        their vectors (gathered from the embedding shards: ``store``, or the ``embeddings`` files read
        for these texts only) and, for ``hnsw``, the index, built once; for ``ivf``, the pool's trained
        ``quantizer`` (:func:`train_quantizer`) filled with this shard's rows (ids ``shard << SHARD_BITS | row``),
        merged with the other shards' by :func:`write_ivf`."""
        texts = sorted(self.entries)
        raw = [self.entries[t][1] for t in texts]
        self.entries = {}
        if store is None:
            store = ShardedEmbeddings(embeddings or [])
        cfg = index_cfg or IndexConfig()
        with atomic_path(folder, is_dir=True) as tmp:
            write_texts(tmp / TEXTS_FILE, texts, raw)
            np.save(tmp / "keys.npy", np.fromiter((key_hash(r) for r in raw), dtype=np.int64, count=len(raw)))
            vecs = np.lib.format.open_memmap(
                tmp / "vectors.npy", mode="w+", dtype=store.dtype, shape=(len(texts), store.dim)
            )
            for start in range(0, len(texts), chunk):
                vecs[start : start + chunk] = store.vectors(texts[start : start + chunk])
            vecs.flush()
            if cfg.type in ("ivf", "hnsw") and len(texts):
                import faiss

                t = time.time()
                if cfg.type == "ivf":  # the pool's one quantizer: rows filed in its lists, ids naming the shard
                    if quantizer is None:
                        raise ValueError(f"pool {name}: an ivf shard needs the pool's {QUANTIZER_FILE}")
                    index = faiss.read_index(str(quantizer))
                    for start in range(0, len(texts), chunk):
                        rows = np.arange(start, min(start + chunk, len(texts)), dtype=np.int64)
                        index.add_with_ids(
                            np.asarray(vecs[start : start + chunk], np.float32), (shard << SHARD_BITS) + rows
                        )
                else:
                    index = build_index(vecs, cfg, k=k, gpu=False)
                faiss.write_index(index, str(tmp / "index.faiss"))
                log.info("pool %s: %s index over %d passages in %.1f s", name, cfg.type, len(texts), time.time() - t)
            del vecs
            write_json(
                tmp / "meta.json",
                {
                    "pool": name,
                    "passages": len(texts),
                    "dim": store.dim,
                    "index": cfg.type if cfg.type in ("ivf", "hnsw") else None,
                },
            )
        return len(texts)


class Pool:
    """One shard of a pool written by :meth:`PoolBuilder.save`, loaded for mining: vectors and key hashes
    memory-mapped, raw texts read from their memory-mapped Arrow file a batch of rows at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_json(self.folder / "meta.json")
        self.keys = np.load(self.folder / "keys.npy", mmap_mode="r")
        self.store = np.load(self.folder / "vectors.npy", mmap_mode="r")
        self.size = len(self.keys)

    def raws(self, rows) -> list[str]:
        """The raw texts of ``rows``: the file is mapped for this call only, so the pages read do not stay
        in the process (a job reads scattered texts of a pool many times its memory)."""
        import pyarrow as pa

        if not len(rows):
            return []
        return read_texts(self.folder / TEXTS_FILE).take(pa.array(rows, pa.int64())).to_pylist()

    def raw(self, x: int) -> str:
        return self.raws([x])[0]

    def vectors(self, rows: list[int]) -> np.ndarray:
        """The float32 vectors of ``rows``, read without mapping them (kalm.io.read_rows: a mine job reads
        ~k scattered rows per query, and through the map each would bring 16 pages into its RSS)."""
        return np.asarray(read_rows(self.store, rows), dtype=np.float32).reshape(len(rows), -1)

    def release(self) -> None:
        """The pages of the vectors and keys read so far leave the process (kalm.io.release_pages)."""
        release_pages(self.store, self.keys)

    def index(self, cfg: IndexConfig, k: int):
        """The search index of this shard alone: hnsw read as built by the pool step, flat ones filled from
        the vectors (a copy of them, cheaper to rebuild than to store twice). An ivf pool is searched whole
        (:meth:`PoolShards.search`)."""
        if cfg.type == "hnsw" and self.size:
            import faiss

            if self.meta.get("index") != cfg.type:
                raise ValueError(f"{self.folder}: pool index is {self.meta.get('index')}, mining asks for {cfg.type}")
            # read, not memory-mapped (faiss.IO_FLAG_MMAP): the search over a mapped index is slower
            index = faiss.read_index(str(self.folder / "index.faiss"))
            index.hnsw.efSearch = max(cfg.ef_search, k)
            return to_gpu(index, cfg, k)
        return build_index(
            self.store,
            IndexConfig(**{**cfg.__dict__, "type": "flat" if cfg.type in ("ivf", "hnsw") else cfg.type}),
            k=k,
        )


RANGES_FILE = "ranges.json"  # a pool's text ranges: which shard folder (shard{j}) holds which passages


def shard_folder(pool_dir: str | Path, shard: int) -> Path:
    return Path(pool_dir) / f"shard{shard}"


class PoolShards:
    """A task's whole pool as its text-range shards (``shard{j}`` under the pool's folder, ``ranges.json``):
    global row = the shard's offset + its row, the same rows as one unsharded pool (the shards are
    consecutive ranges of the sorted texts). Searched one shard at a time (:meth:`search`), so a mine job
    holds one shard's index, never the pool's; texts and vectors are memory-mapped, the key hashes of
    every shard (8 bytes a passage) are in memory for the exclusion checks and random pads."""

    def __init__(self, folder: str | Path, cfg: IndexConfig, index_k: int):
        self.folder, self.cfg, self.index_k = Path(folder), cfg, index_k
        self.ranges = read_json(self.folder / RANGES_FILE)
        self.shards = [Pool(shard_folder(folder, j)) for j in range(self.ranges["shards"])]
        self.offsets = np.cumsum([0] + [p.size for p in self.shards])
        self.size = int(self.offsets[-1])
        self.keys = np.concatenate([np.asarray(p.keys) for p in self.shards]) if self.shards else np.zeros(0, np.int64)
        self.release()
        self.dim = next((int(p.meta["dim"]) for p in self.shards if p.size), 0)
        self._cached: tuple[int, object] | None = None  # one shard: its index stays loaded across tasks

    def _shard_rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return which, rows - self.offsets[which]

    def raws(self, rows) -> list[str]:
        """The raw texts of global ``rows``, read shard by shard."""
        which, local = self._shard_rows(rows)
        out: list[str] = [""] * len(local)
        for j in np.unique(which):
            sel = np.nonzero(which == j)[0]
            for i, text in zip(sel.tolist(), self.shards[j].raws(local[sel])):
                out[i] = text
        return out

    def raw(self, x: int) -> str:
        return self.raws([x])[0]

    def release(self) -> None:
        for shard in self.shards:
            shard.release()

    def vectors(self, rows) -> np.ndarray:
        which, local = self._shard_rows(rows)
        out = np.empty((len(local), self.dim), dtype=np.float32)
        for j in np.unique(which):
            sel = np.nonzero(which == j)[0]
            out[sel] = self.shards[j].vectors(local[sel])
        return out

    def global_rows(self, ids: np.ndarray) -> np.ndarray:
        """Global rows of ivf ids ``shard << SHARD_BITS | row`` (-1 stays -1)."""
        shard = np.where(ids >= 0, ids >> SHARD_BITS, 0)
        return np.where(ids >= 0, self.offsets[shard] + (ids & ((1 << SHARD_BITS) - 1)), -1)

    def _search_ivf(self, query_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ivf search: the pool's shards share one quantizer and their lists are merged on disk in pieces
        of consecutive lists (``<pool>/ivf``, :func:`write_ivf`), so a query scans ``nprobe`` lists of the pool
        once, whatever the number of shards, and finds the passages one unsharded ivf would (the same lists).
        The pieces are mapped one at a time and scanned list by list (:func:`scan_lists`): the job's memory
        holds one piece, not the pool, and each list is read once for all the queries that probe it. The
        candidates are re-scored from the pieces too (:func:`rescore_entries`), in a second pass."""
        import faiss

        best_ids = np.full((len(query_vecs), k), -1, dtype=np.int64)
        best_scores = np.full((len(query_vecs), k), -np.inf, dtype=np.float32)
        if not self.size:
            return best_ids, best_scores
        t = time.time()
        folder = self.folder / IVF_DIR
        meta = read_ivf_pieces(folder)
        quantizer = faiss.read_index(str(folder / QUANTIZER_FILE))
        ivf = faiss.extract_index_ivf(quantizer)
        nprobe = min(self.cfg.nprobe, ivf.nlist)
        _, probes = ivf.quantizer.search(query_vecs, nprobe)  # what ivf.search would probe, for every query
        probers = ListProbers(probes, ivf.nlist)
        del quantizer, ivf
        best = faiss.ResultHeap(len(query_vecs), min(self.size, k + RESCORE_EXTRA), keep_max=True)
        for piece in meta["pieces"]:
            lo, hi = piece["lists"]
            if probers.any(lo, hi):
                index = faiss.read_index(str(folder / piece["file"]), faiss.IO_FLAG_ONDISK_SAME_DIR)
                scan_lists(index.invlists, lo, hi, query_vecs, probers, best)
                del index  # unmaps the piece
        # the candidates' ids, and their scores as rescore() computes them, read from the pieces (one pass)
        ids, scores = rescore_entries(folder, meta["pieces"], query_vecs, best.I)
        ids, scores = rank_by_score(self.global_rows(ids), scores, k)
        best_ids[:, : ids.shape[1]], best_scores[:, : ids.shape[1]] = ids, scores
        log.info(
            "searched the pool's ivf (%d passages, %d lists in %d pieces, nprobe %d) for %d queries in %.1f s",
            self.size,
            meta["lists"],
            len(meta["pieces"]),
            nprobe,
            len(query_vecs),
            time.time() - t,
        )
        return best_ids, best_scores

    def _index(self, j: int):
        if self._cached is not None and self._cached[0] == j:
            return self._cached[1]
        self._cached = None
        index = self.shards[j].index(self.cfg, self.index_k)
        if len(self.shards) == 1:
            self._cached = (j, index)
        return index

    def search(self, query_vecs: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the ``k`` best rows of the whole pool and their exact scores (n x k arrays, ranked by
        score, then row; row -1 past the pool's end): each shard's best ``k`` (:func:`search_rescored`),
        merged. With exact (flat) indexes this is the unsharded result; hnsw approximates each shard on its
        own (an index per shard); ivf searches the pool's one merged index (:meth:`_search_ivf`)."""
        if self.cfg.type == "ivf":
            return self._search_ivf(query_vecs, k)  # every query at once: a list is read once for all
        best_ids = np.full((len(query_vecs), k), -1, dtype=np.int64)
        best_scores = np.full((len(query_vecs), k), -np.inf, dtype=np.float32)
        for j, shard in enumerate(self.shards):
            if not shard.size:
                continue
            t = time.time()
            index = self._index(j)
            offset = int(self.offsets[j])
            for start in range(0, len(query_vecs), batch):
                ids, scores = search_rescored(index, shard, query_vecs[start : start + batch], min(k, shard.size))
                ids = np.where(ids >= 0, ids + offset, -1)
                rows = slice(start, start + len(ids))
                merged = rank_by_score(
                    np.concatenate([best_ids[rows], ids], axis=1),
                    np.concatenate([best_scores[rows], scores], axis=1),
                    k,
                )
                best_ids[rows], best_scores[rows] = merged
            del index
            shard.release()  # its vectors were read for the re-scoring: one shard's pages at a time
            log.info(
                "searched pool shard %d/%d (%d passages) for %d queries in %.1f s",
                j,
                len(self.shards),
                shard.size,
                len(query_vecs),
                time.time() - t,
            )
        return best_ids, best_scores


SAMPLE_MAX = 20_000  # texts in a pool's range sample at most: its memory stays bounded however many shards
TRAIN_SAMPLE = 100_000  # ivf: the coarse quantizer's training texts at most (a bottom-k sample of the pool)
MIN_POINTS_PER_LIST = 39  # faiss's k-means wants at least this many training points per centroid


def bottom_k(texts, k: int, count_k: int = 0) -> tuple[list[str], int | None]:
    """The ``k`` distinct texts of smallest :func:`kalm.mining.embed.text_digest` (a uniform sample of the
    distinct texts that depends on their set only, not on order or repeats), in digest order, and the
    number of distinct texts, counted on the ``max(k, count_k)`` smallest digests (:class:`DigestSketch`:
    8 bytes each, no text kept for them): exact below that, else the KMV estimate; None when both are 0."""
    import heapq

    heap: list[tuple[int, str]] = []  # (-hash, text): the largest kept hash on top
    kept: set[int] = set()
    sketch = DigestSketch(max(k, count_k))
    for text in texts:
        h = text_digest(text)
        sketch.add(h)
        if not k or h in kept or (len(heap) == k and h >= -heap[0][0]):
            continue
        kept.add(h)
        if len(heap) == k:
            kept.discard(-heapq.heapreplace(heap, (-h, text))[0])
        else:
            heapq.heappush(heap, (-h, text))
    sample = [t for _, t in sorted(heap, reverse=True)]  # ascending digest
    return sample, sketch.distinct() if sketch.k else None


class DigestSketch:
    """The ``k`` smallest distinct 64-bit digests seen (a numpy array, merged a block at a time): a uniform
    sample of the distinct texts by digest, and their count (exact below ``k``, else the KMV estimate
    ``(k - 1) 2^64 / h_k``)."""

    def __init__(self, k: int, block: int = 65536):
        self.k, self.block = k, block
        self.smallest = np.zeros(0, dtype=np.uint64)
        self._pending: list[int] = []

    def add(self, digest: int) -> None:
        if self.k:
            self._pending.append(digest)
            if len(self._pending) >= self.block:
                self._merge()

    def add_many(self, digests: np.ndarray) -> None:
        if self.k:
            self._merge(np.asarray(digests, dtype=np.uint64))

    def _merge(self, more: np.ndarray | None = None) -> None:
        new = np.asarray(self._pending, dtype=np.uint64)
        if more is not None:
            new = np.concatenate([new, more])
        self._pending = []
        if len(self.smallest) == self.k:  # full: only a digest below the largest kept can enter
            new = new[new < self.smallest[-1]]
        if len(new):  # sort k + the newcomers, not k + the whole block (k is 64 x nlist in two-level training)
            self.smallest = sorted_unique(np.concatenate([self.smallest, new]))[: self.k]

    def digests(self) -> np.ndarray:
        """The smallest distinct digests, ascending."""
        self._merge()
        return self.smallest

    def distinct(self) -> int:
        d = self.digests()
        return len(d) if len(d) < self.k else round((self.k - 1) * 2**64 / (int(d[-1]) + 1))


def range_sample_size(shards: int) -> int:
    """Texts of a pool's bottom-k sample that its range quantiles are taken from: 1,000 a shard, at most
    ``SAMPLE_MAX`` (a shard within a few percent of its share up to ~100 shards); none for one shard."""
    return min(1000 * shards, SAMPLE_MAX) if shards > 1 else 0


def boundaries_of(sample: list[str], shards: int) -> list[str]:
    """``shards - 1`` texts splitting a pool into ranges of about equal numbers of distinct texts: the
    quantiles of the first :func:`range_sample_size` texts of its digest-ordered bottom-k ``sample`` (itself
    the bottom-k of that size), which depends on the set of texts only, not on their order or on how the
    input is split. The ranges only balance the shards; the mined records do not depend on them."""
    head = sorted(sample[: range_sample_size(shards)])
    return [head[(j * len(head)) // shards] for j in range(1, shards)] if head else []


def ivf_lists(distinct: int, cfg: IndexConfig) -> int:
    """The lists of a pool's IVF: ``nlist``, or its distinct passages / ``list_size`` (a constant list size,
    so a query scans ``nprobe x list_size`` passages whatever the pool's size), at most one per passage."""
    n = cfg.nlist or round(distinct / max(1, cfg.list_size))
    return max(1, min(n, distinct)) if distinct else 1


def pool_name(task: str, pool: str) -> str:
    """The folder of a task's pool: its own (``pool="task"``) or the shared one."""
    return GLOBAL_POOL if pool == "global" else task


def pool_names(mine_tasks, pool: str, only: str | None = None) -> list[str]:
    """The pools of the mined tasks (``only``: that one, if a mined task has it), sorted."""
    return sorted({pool_name(t, pool) for t in mine_tasks if only in (None, pool_name(t, pool))})


@dataclass
class MineSettings:
    window: tuple[int, int] = (50, 100)
    negative_number: int = 7
    filter_topk: int | None = 50
    margin_ratio: float | None = None
    pad: str = "random"
    sampling: str = "random"
    seed: int = 0
    query_batch: int = 4096
    query_instruction: bool = True
    passage_instruction: str = "symmetric"
    given_negatives: str = "keep"

    def search_k(self, pool_size: int) -> int:
        """Candidates to retrieve: the window's end, and rank ``filter_topk`` (0-based) for the filter."""
        return min(pool_size, max(self.window[1], self.filter_topk + 1 if self.filter_topk else 0))

    def check(self) -> None:
        lo, hi = self.window
        if not 0 <= lo < hi:
            raise ValueError(f"range_for_sampling must be [lo, hi) with 0 <= lo < hi, got {list(self.window)}")
        if self.sampling not in ("random", "top"):
            raise ValueError(f"sampling must be 'random' or 'top', not {self.sampling!r}")
        if self.pad not in ("random", "none"):
            raise ValueError(f"pad must be 'random' or 'none', not {self.pad!r}")
        if self.given_negatives not in GIVEN_NEGATIVES:
            raise ValueError(f"given_negatives must be one of {GIVEN_NEGATIVES}, not {self.given_negatives!r}")
        if self.margin_ratio is not None and not 0 < self.margin_ratio <= 1:
            raise ValueError(f"margin_ratio must be in (0, 1], got {self.margin_ratio}")


def _random_pads(pool: Pool, banned: set[int], used: set[int], missing: int, rng: random.Random) -> list[int]:
    """Up to ``missing`` random pool rows that are neither used nor banned (rejection sampling), with
    distinct keys (``banned``: key hashes, updated)."""
    picked: list[int] = []
    for _ in range(20 * missing + 20):  # a big pool: a few draws; a tiny one falls back below
        if len(picked) == missing:
            return picked
        x = rng.randrange(pool.size)
        if x not in used and pool.keys[x] not in banned:
            used.add(x)
            banned.add(int(pool.keys[x]))
            picked.append(x)
    rest = [x for x in range(pool.size) if x not in used and pool.keys[x] not in banned]
    rng.shuffle(rest)
    for x in rest:
        if len(picked) == missing:
            break
        if pool.keys[x] not in banned:
            banned.add(int(pool.keys[x]))
            picked.append(x)
    return picked


def given_negatives(rec: dict, passages: list[str], s: MineSettings, stats: StageStats) -> list[tuple[str, str]]:
    """The (raw, encoder-side) given negatives a mined record keeps, counted (module docstring, step 2)."""
    given = rec.get("neg", [])
    stats.extra["given_negatives_seen"] += len(given)
    if s.given_negatives == "replace":
        stats.extra["given_negatives_replaced"] += len(given)
        return []
    labelled = {dedup_key(t) for t in rec["pos"] + [rec["query"]]}
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for raw, formatted in zip(given, passages[len(rec["pos"]) :]):
        key = dedup_key(raw)
        if key in labelled:  # a "negative" that is the positive or the query: a label error
            stats.extra["given_negatives_equal_to_positive_or_query"] += 1
        elif key in seen:
            stats.extra["given_negatives_duplicate"] += 1
        elif len(kept) == s.negative_number:
            stats.extra["given_negatives_truncated"] += 1
        else:
            seen.add(key)
            kept.append((raw, formatted))
    stats.extra["given_negatives_kept"] += len(kept)
    return kept


RESCORE_EXTRA = 8  # candidates searched beyond k, so that re-scoring decides the k-th place too


def exact_scores(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Inner products along the last axis, the same bits whatever the batch: elementwise products (exact
    for vectors stored as float16) summed by numpy's pairwise sum over each row, a fixed order. A BLAS or
    FAISS kernel may sum in another order for another batch shape (its blocking), and a near-tie then
    goes either way: a record's filter verdict or window would depend on which query shard mines it."""
    return np.multiply(vectors, queries).sum(axis=-1)


def search_rescored(
    index, pool, query_vecs: np.ndarray, k: int, block: int = 256, decode=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the ``k`` best pool rows and their scores (n x k arrays; row -1 and score -inf past the
    pool's end): FAISS finds ``k + RESCORE_EXTRA`` candidates (``decode``: its ids to pool rows),
    :func:`exact_scores` scores them, and they are ranked by score, then row (ties)."""
    kk = min(pool.size, k + RESCORE_EXTRA)
    _, ids = index.search(query_vecs, kk)
    if decode is not None:
        ids = decode(ids)
    return rescore(pool, query_vecs, ids, k, block)


def rescore(pool, query_vecs: np.ndarray, ids: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best of its candidate pool ``ids`` (-1: none) by :func:`exact_scores`, then row."""
    out_ids = np.full((len(query_vecs), k), -1, dtype=np.int64)
    out_scores = np.full((len(query_vecs), k), -np.inf, dtype=np.float32)
    for b in range(0, len(query_vecs), block):
        blk = ids[b : b + block]
        vecs = pool.vectors(np.where(blk >= 0, blk, 0).ravel()).reshape(*blk.shape, -1)
        scores = np.where(blk >= 0, exact_scores(vecs, query_vecs[b : b + block, None, :]), -np.inf)
        best_ids, best_scores = rank_by_score(blk, scores, k)
        out_ids[b : b + len(blk), : best_ids.shape[1]] = best_ids
        out_scores[b : b + len(blk), : best_ids.shape[1]] = best_scores
    return out_ids, out_scores


def rank_by_score(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best (id, score) pairs: by score, then id; ids -1 (no candidate) last."""
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
    ids, scores = np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)
    return ids, np.where(ids >= 0, scores, -np.inf).astype(np.float32)


def window_flags(keys: list[int], banned: set[int], banned_given: set[int]) -> tuple[np.ndarray, ...]:
    """Per candidate of a window (``keys``: their :func:`key_hash`, best-ranked first): the same text as a
    positive or the query (``banned``), as a given negative (``banned_given``), as a better-ranked candidate.
    Set lookups in Python: a window holds tens of candidates, and ``np.isin`` / ``np.unique`` cost ~20 us a
    call there (measured 2026-12-08: 1.2 s of a 24k-record mine job's 7 s)."""
    seen: set[int] = set()
    repeated = []
    for key in keys:
        repeated.append(key in seen)
        seen.add(key)
    return (
        np.array([key in banned for key in keys], dtype=bool),
        np.array([key in banned_given for key in keys], dtype=bool),
        np.array(repeated, dtype=bool),
    )


def record_rng(rec: dict, s: MineSettings, task: str, i: int) -> random.Random:
    """The sampling RNG of one record: seeded by (seed, record id), so a record draws the same negatives
    and pads whichever query shard mines it (records without an id, hand-made JSON Lines: by task and place)."""
    return random.Random(f"{s.seed}:{rec['id']}" if "id" in rec else f"{s.seed}:{task}:{i}")


def mine_records(
    records: list[dict],
    texts: list[tuple[str, list[str]]],
    pool: PoolShards,
    store: ShardedEmbeddings,
    s: MineSettings,
    stats: StageStats,
) -> list[dict]:
    """Mine negatives for ``records`` (one task) whose encoder-side texts are ``texts``; ``store`` holds
    the vectors of the records' own texts, ``pool`` those of the candidates. Every query is searched
    first (pool shard by shard: one shard's index in memory), then each record is mined."""
    task = records[0]["task"]
    lo, hi = s.window
    k = s.search_k(pool.size)
    all_query_vecs = store.vectors([q for q, _ in texts])  # this shard's queries of the task: n x dim float32
    found_ids, found_scores = pool.search(all_query_vecs, k, s.query_batch)
    out = []
    for start in range(0, len(records), s.query_batch):
        recs, txts = records[start : start + s.query_batch], texts[start : start + s.query_batch]
        query_vecs = all_query_vecs[start : start + s.query_batch]
        # the block's positives and given negatives, looked up at once (one binary search per text)
        ends = np.cumsum([len(p) for _, p in txts])
        block_vecs = store.vectors([t for _, p in txts for t in p])
        picked_rows: list[tuple[dict, list[int]]] = []  # raw texts of the picked negatives: read per block
        for j, (rec, (_, passages)) in enumerate(zip(recs, txts)):
            rng = record_rng(rec, s, task, start + j)
            vecs = block_vecs[ends[j] - len(passages) : ends[j]]
            pos_scores = exact_scores(vecs[: len(rec["pos"])], query_vecs[j])
            pos_score = float(pos_scores.max())
            n_found = int((found_ids[start + j] >= 0).sum())  # -1: fewer than k in the pool
            ids, scores = found_ids[start + j, :n_found], found_scores[start + j, :n_found]
            if s.filter_topk and len(scores) > s.filter_topk and pos_score < scores[s.filter_topk]:
                stats.drop("ranking_inconsistent", task=task)
                continue
            given = given_negatives(rec, passages, s, stats)
            row_of = {f: i for i, f in enumerate(passages)}
            given_scores = exact_scores(vecs[[row_of[f] for _, f in given]], query_vecs[j]) if given else []
            banned = {key_hash(t) for t in rec["pos"] + [rec["query"]]}
            banned_given = {key_hash(r) for r, _ in given} - banned
            cand_ids, cand_scores = ids[lo:hi], scores[lo:hi]
            ranks = np.arange(lo, lo + len(cand_ids))
            equal, equal_given, repeated = window_flags(pool.keys[cand_ids].tolist(), banned, banned_given)
            keep = ~equal & ~equal_given & ~repeated
            banned |= banned_given
            stats.extra["candidates_in_window"] += len(cand_ids)
            stats.extra["candidates_equal_to_positive_or_query"] += int(equal.sum())
            stats.extra["candidates_equal_to_given_negative"] += int((equal_given & ~equal).sum())
            stats.extra["candidates_repeated"] += int((repeated & ~equal & ~equal_given).sum())
            if s.margin_ratio is not None:
                low = float(pos_scores.min())
                over = cand_scores > low - abs(low) * (1 - s.margin_ratio)
                stats.extra["candidates_over_margin"] += int((over & keep).sum())
                keep &= ~over
            window = list(zip(ranks[keep].tolist(), cand_ids[keep].tolist(), cand_scores[keep].tolist()))
            wanted = s.negative_number - len(given)
            if s.sampling == "top":  # deterministic: the best-ranked candidates of the window
                picked = window[:wanted]
            else:
                picked = rng.sample(window, min(wanted, len(window)))
            stats.extra["negatives_from_window"] += len(picked)
            missing = wanted - len(picked)
            if missing and s.pad == "random":
                taken = banned | {int(pool.keys[c[1]]) for c in picked}
                pads = _random_pads(pool, taken, {c[1] for c in picked}, missing, rng)
                pad_scores = exact_scores(pool.vectors(pads), query_vecs[j]) if pads else []
                picked += [(PAD_RANK, x, float(sc)) for x, sc in zip(pads, pad_scores)]
                stats.extra["negatives_padded_random"] += len(pads)
            if len(given) + len(picked) < s.negative_number:
                stats.extra["records_short_of_negatives"] += 1
            mined = dict(rec)
            mined["neg"] = [r for r, _ in given]
            picked_rows.append((mined, [x for _, x, _ in picked]))
            mined["neg_ranks"] = [GIVEN_RANK] * len(given) + [r for r, _, _ in picked]
            mined["neg_scores"] = [round(float(sc), 6) for sc in given_scores] + [round(sc, 6) for _, _, sc in picked]
            mined["pos_score"] = round(pos_score, 6)
            out.append(mined)
            stats.keep(task=task)
        raws = iter(pool.raws([x for _, xs in picked_rows for x in xs]))
        for mined, xs in picked_rows:
            mined["neg"] += [next(raws) for _ in xs]
        pool.release()
    return out


# ---- the stage: pools (once), query shards (one job each), merge -----------------------------------

RECORD_COLUMNS = ["id", "task", "query", "pos", "neg", "instruction"]
# stats extras that are settings, the same in every query shard: copied, never summed, by the merge
SETTINGS = ("negative_number", "filter_topk", "margin_ratio")


def _as_list(paths) -> list[str]:
    return [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]


def iter_task_records(paths, tasks: set[str] | None = None, columns: list[str] | None = None):
    """The records of ``tasks`` (all when None) in ``paths``, in file order, streamed a row group at a
    time; a Parquet row group whose ``task`` statistics exclude every wanted task is skipped unread."""
    import pyarrow.parquet as pq

    from kalm.data.shards import iter_shard

    for path in _as_list(paths):
        if not path.endswith(".parquet"):
            yield from (r for r in iter_shard(path) if tasks is None or r["task"] in tasks)
            continue
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        cols = [c for c in (columns or names) if c in names]
        t_col = names.index("task")
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(t_col).statistics
            if (
                tasks is not None
                and st is not None
                and st.has_min_max
                and isinstance(st.min, str)
                and isinstance(st.max, str)
                and not any(st.min <= t <= st.max for t in tasks)
            ):
                continue
            for row in pf.read_row_group(g, columns=cols).to_pylist():
                if tasks is None or row["task"] in tasks:
                    yield {k: v for k, v in row.items() if v is not None}


def task_counts(paths) -> dict[str, int]:
    """Records per task in ``paths`` (only the task column is read)."""
    counts: dict[str, int] = defaultdict(int)
    for path in _as_list(paths):
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(columns=["task"]):
                for t in batch.column(0).to_pylist():
                    counts[t] += 1
        else:
            for rec in iter_task_records(path):
                counts[rec["task"]] += 1
    return dict(counts)


def _pool_passages(
    inputs, mine_tasks: dict[str, bool], pool: str, only: str | None, query_instruction: bool, passage_instruction: str
):
    """(pool name, encoder-side text, raw text, order) of every candidate passage of the mined tasks of
    ``inputs`` (``only``: of that pool), streamed; ``order`` (record id, place) picks a text's first raw form."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, not {pool!r}")
    tasks = {t for t in mine_tasks if only is None or pool_name(t, pool) == only}
    for n, rec in enumerate(iter_task_records(inputs, tasks, RECORD_COLUMNS)):
        task = rec["task"]
        _, passages = mining_texts(rec, mine_tasks[task], query_instruction, passage_instruction)
        rid = rec.get("id", n)
        for i, (formatted, raw) in enumerate(zip(passages, rec["pos"] + rec.get("neg", []))):
            yield pool_name(task, pool), formatted, raw, (rid, i)


def pool_samples(
    inputs,
    mine_tasks: dict[str, bool],
    k: int,
    pool: str = "task",
    only: str | None = None,
    query_instruction: bool = True,
    passage_instruction: str = "symmetric",
    count_k: int = 0,
) -> dict[str, tuple[list[str], int | None]]:
    """{pool name: its :func:`bottom_k` sample of ``k`` encoder-side texts and its distinct passages}."""
    names = pool_names(mine_tasks, pool, only)
    out = {}
    for name in names:  # one pass per pool: one sample alive at a time
        passages = _pool_passages(inputs, mine_tasks, pool, name, query_instruction, passage_instruction)
        out[name] = bottom_k((formatted for _, formatted, _, _ in passages), k, count_k) if k or count_k else ([], None)
    return out


def write_ranges(
    inputs,
    mine_tasks: dict[str, bool],
    pools_dir: str,
    shards: int,
    *,
    pool: str = "task",
    only: str | None = None,
    settings: MineSettings | None = None,
    index: IndexConfig | None = None,
) -> dict[str, list[str]]:
    """``kalm mine --step ranges``: each pool's ``ranges.json`` and range files (``only``: one pool's). The
    range boundaries are quantiles of a bottom-k sample by digest (the same whatever the shards); for an
    ``ivf`` index the pool's distinct passages are counted on its ``TRAIN_SAMPLE`` smallest digests (the
    quantizer job draws its training texts from the range files: :func:`train_sample`)."""
    s = settings or MineSettings()
    if shards < 1:
        raise ValueError(f"pool shards must be >= 1, got {shards}")
    ivf = index is not None and index.type == "ivf"
    samples = pool_samples(
        inputs,
        mine_tasks,
        range_sample_size(shards),
        pool,
        only,
        s.query_instruction,
        s.passage_instruction,
        count_k=TRAIN_SAMPLE if ivf else 0,
    )
    if only is not None:
        samples.setdefault(only, ([], 0))  # a pool without records: its empty shards
    ranges = {}
    for name, (sample, distinct) in samples.items():
        ranges[name] = bounds = boundaries_of(sample, shards)
        scatter_passages(inputs, mine_tasks, pools_dir, name, bounds, pool, s, shards=shards)
        write_json(
            Path(pools_dir) / name / RANGES_FILE,
            {
                "pool": name,
                "shards": shards,
                "boundaries": bounds,
                "distinct_passages": distinct,
                "sample": len(sample),
                "rule": "shard j holds the texts t with boundaries[j-1] <= t < boundaries[j]",
                "passages": f"{RANGES_DIR}/r<j>.parquet: every candidate passage of shard j's range, in input order",
            },
        )
    return ranges


QUANTIZER_FILE = "quantizer.faiss"  # ivf: the pool's trained, empty IVF (its coarse centroids), shared by its shards
IVF_DIR = "ivf"  # ivf: the pool's shards' lists merged on disk in pieces (IVF_PIECES), what mine searches
SHARD_BITS = 40  # ivf ids: shard << SHARD_BITS | row in the shard (global row = the shard's offset + row)


def train_quantizer(pools_dir: str, name: str, embeddings: list[str], cfg: IndexConfig) -> int:
    """``kalm mine --step quantizer``: the coarse quantizer of pool ``name``'s IVF, trained once and shared by
    every shard, so that each passage falls in the same list whatever the shards and a query probes ``nprobe``
    lists of the whole pool (one scan, :func:`write_ivf`), not ``nprobe`` of each shard. Trained on the
    pool's bottom-k sample (:func:`train_sample`) when it holds ``MIN_POINTS_PER_LIST`` points a list; a larger
    pool's centroids are trained cell by cell (:func:`two_level_centroids`), so ``nlist`` keeps up with the
    pool without its training points in one array. Returns the number of lists."""
    import faiss

    folder = Path(pools_dir) / name
    meta = read_json(folder / RANGES_FILE)
    store = ShardedEmbeddings(embeddings)
    sample = train_sample(folder, store)
    distinct = meta.get("distinct_passages") or len(sample)
    nlist = ivf_lists(distinct, cfg)
    t = time.time()
    if not len(sample):  # an empty pool: one list at the origin, so that the shards and the merge still have an index
        centroids = np.zeros((1, store.dim), dtype=np.float32)
    elif nlist * MIN_POINTS_PER_LIST <= len(sample) or distinct <= len(sample):
        centroids = kmeans(sample, min(nlist, len(sample)))  # a sample holding the whole pool trains what it can
    else:
        centroids = two_level_centroids(folder, store, sample, nlist)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(store.dim), store.dim, len(centroids), faiss.METRIC_INNER_PRODUCT)
    index.quantizer.add(centroids)
    index.is_trained = True
    if len(centroids) >= HNSW_QUANTIZER_LISTS:
        index = hnsw_quantized(index, cfg)
    with atomic_path(folder / QUANTIZER_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    log.info(
        "pool %s: ivf quantizer, %d lists for ~%s distinct passages, trained in %.1f s",
        name,
        len(centroids),
        distinct,
        time.time() - t,
    )
    return len(centroids)


def range_digests(folder: Path, batch: int = 65536):
    """The :func:`kalm.mining.embed.text_digest` of every passage of a pool's range files (repeats included),
    a numpy array per batch: their ``digest`` column, written by :func:`scatter_passages`, so no text is read
    or hashed again here."""
    import pyarrow.parquet as pq

    for path in sorted((folder / RANGES_DIR).glob("r*.parquet")):
        for b in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["digest"]):
            yield b.column("digest").to_numpy()


def smallest_digests(folder: Path, k: int) -> np.ndarray:
    """The ``k`` smallest distinct digests of a pool's passages (its range files), ascending."""
    sketch = DigestSketch(k)
    for digests in range_digests(folder):
        sketch.add_many(digests)
    return sketch.digests()


def train_sample(folder: Path, store: ShardedEmbeddings) -> np.ndarray:
    """The quantizer's training points: the vectors of the pool's ``TRAIN_SAMPLE`` distinct passages of
    smallest digest (a uniform sample that depends on the pool's set of texts only), in digest order, read
    from the range files: 8 bytes a sampled passage and its vector, never its text (the sample's texts, held
    by mine_ranges until 2026-12-07, made that job's memory grow with the pool up to the cap). The vectors
    stay in the shards' dtype (float16 by default: half of a float32 copy), which :func:`kmeans` trains on."""
    return store.vectors_of_digests(smallest_digests(folder, TRAIN_SAMPLE), dtype=store.dtype)


def kmeans(points: np.ndarray, k: int) -> np.ndarray:
    """``k`` centroids of ``points`` as an inner-product IVF trains them (faiss's spherical k-means, its
    default iterations and seed): the same centroids ``IndexIVFFlat.train`` would give on ``points`` as
    float32. float16 points are not converted: faiss's ``Clustering.train_encoded`` takes them as the codes of
    an fp16 scalar quantizer and decodes them block by block (the same centroids, bit for bit, without the
    float32 copy that doubled the quantizer job's sample; ~1.4x the time, measured)."""
    import faiss

    d = points.shape[1]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, k, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1  # the callers give enough points; faiss would only warn
    if points.dtype != np.float16:
        ivf.train(np.ascontiguousarray(points, dtype=np.float32))
        return ivf.quantizer.reconstruct_n(0, k)
    clustering = faiss.Clustering(d, k, ivf.cp)  # what IndexIVF.train runs: the IVF's parameters (spherical)
    codec = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16)
    clustering.train_encoded(np.ascontiguousarray(points).view(np.uint8), codec, faiss.IndexFlatIP(d))
    return faiss.vector_to_array(clustering.centroids).reshape(k, d)


CELL_POINTS_PER_LIST = 64  # two-level training: points drawn per fine list (faiss's minimum is 39)


def two_level_centroids(
    folder: Path, store: ShardedEmbeddings, sample: np.ndarray, nlist: int, chunk: int = 65536
) -> np.ndarray:
    """``nlist`` centroids for a pool too large for its bottom-k sample to train them (``MIN_POINTS_PER_LIST``
    points a list), trained as faiss's ``two_level_clustering`` does but without holding the points: ~sqrt(nlist)
    coarse cells by k-means on the sample; then the pool's passages of smallest digest, ``CELL_POINTS_PER_LIST``
    a list (a uniform sample of its distinct texts, read from the range files ``mine_ranges`` wrote), are
    filed in their cell and written to a temporary file; each cell in turn gets its share of the lists (in
    proportion to its points) by k-means on its points alone. Memory: the sample, the chosen digests (8 bytes
    each) and one cell's points; the temporary file holds ``CELL_POINTS_PER_LIST x nlist`` vectors."""
    import faiss

    digests = smallest_digests(folder, CELL_POINTS_PER_LIST * nlist)  # a uniform sample of the distinct passages
    cells = max(1, min(round(nlist**0.5), len(sample)))
    coarse = faiss.IndexFlatIP(store.dim)
    coarse.add(kmeans(sample, cells))
    cell_of = np.empty(len(digests), dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix=".train.", dir=folder) as tmp:
        points = np.lib.format.open_memmap(Path(tmp) / "points.npy", "w+", store.dtype, (len(digests), store.dim))
        for start in range(0, len(digests), chunk):
            vecs = store.vectors_of_digests(digests[start : start + chunk])
            cell_of[start : start + len(vecs)] = coarse.search(vecs, 1)[1][:, 0]
            points[start : start + len(vecs)] = vecs
        points.flush()
        del points
        points = np.load(Path(tmp) / "points.npy", mmap_mode="r")
        counts = np.bincount(cell_of, minlength=cells)
        lists = share_lists(counts, nlist)
        by_cell = np.argsort(cell_of, kind="stable")
        ends = np.cumsum(counts)
        out = []
        for c in np.nonzero(lists)[0]:
            rows = by_cell[ends[c] - counts[c] : ends[c]]
            out.append(kmeans(read_rows(points, rows), int(lists[c])))
        del points
    log.info(
        "two-level quantizer: %d cells, %d lists from %d passages (%d to %d a cell)",
        cells,
        int(lists.sum()),
        len(digests),
        int(counts.min()),
        int(counts.max()),
    )
    return np.vstack(out)


def share_lists(counts: np.ndarray, nlist: int) -> np.ndarray:
    """``nlist`` lists shared among cells of ``counts`` points in proportion (largest remainders), at least one
    for a cell with points and never more than its points."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(len(counts), dtype=np.int64)
    nlist = min(nlist, total)
    exact = counts * nlist / total
    lists = np.floor(exact).astype(np.int64)
    lists[(counts > 0) & (lists == 0)] = 1
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if lists.sum() >= nlist:
            break
        if lists[c] < counts[c]:
            lists[c] += 1
    return np.minimum(lists, counts)


# From this many lists on (faiss's own choice for its large indexes, IVF65536_HNSW32), the centroids are found
# through an HNSW graph. Below it a flat quantizer is faster: filing a passage is one BLAS product with nlist
# centroids, while the graph costs ~efSearch x 32 distances and a traversal per passage. Measured 2026-12-07
# on one core, 128-d random unit centroids, 20,000 passages: flat 13.9 / 46.7 / 190 us a passage at 4,096 /
# 16,384 / 65,536 lists, HNSW (efSearch 128) 108 / 202 / 665 us and not always the nearest list (99.7 / 95.2 /
# 75.0%); at 1M records (1,888 lists) mine_index took 3.2x the CPU time per record of 100k behind HNSW, 1.5x
# with the flat quantizer. (16,384 until then, where the flat product is still 4x faster.) A two-level quantizer
# (an IVF over the centroids, sqrt(nlist) cells, faiss's IVF<n>(IVF<sqrt n>,Flat)) files 2.2x faster at 1,888
# lists probing 4 cells, but the pool's search lost recall (2026-12-07, the 1M benchmark's pool of 483k
# passages, 2,000 queries, nprobe 32, recall@40 against exact search: flat 0.644, 4 cells 0.530, 8 cells
# 0.597 for 1.5x; 4,096 lists: 0.579 / 0.469 / 0.531): not used.
HNSW_QUANTIZER_LISTS = 65536


def hnsw_quantized(index, cfg: IndexConfig):
    """``index``'s trained centroids behind an HNSW graph (faiss's ``IVF<n>_HNSW32``): filing a passage or
    routing a query costs O(log nlist) instead of nlist inner products, so with ``nlist`` growing with the pool
    (a constant list size) neither a shard job's adding nor a query's list choice grows with it."""
    import faiss

    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    quantizer = faiss.IndexHNSWFlat(index.d, 32, faiss.METRIC_INNER_PRODUCT)
    quantizer.hnsw.efConstruction = 80
    quantizer.hnsw.efSearch = max(128, 2 * cfg.nprobe)
    quantizer.add(centroids)
    out = faiss.IndexIVFFlat(quantizer, index.d, index.nlist, faiss.METRIC_INNER_PRODUCT)
    out.is_trained = True
    out.own_fields = True
    quantizer.this.disown()  # the IVF owns its quantizer now
    return out


IVF_PIECES = "pieces.json"  # ivf: the merged lists' pieces (their list ranges and files), in <pool>/ivf


def list_pieces(sizes: np.ndarray, entry_bytes: int, piece_bytes: float) -> list[tuple[int, int]]:
    """Consecutive list ranges ``[lo, hi)`` covering ``sizes`` (passages per list), each holding at most
    ``piece_bytes`` of entries (``entry_bytes`` a passage), a larger list alone in its piece."""
    bounds, held = [0], 0
    for i, n in enumerate(sizes.tolist()):
        if held and held + n * entry_bytes > piece_bytes:
            bounds.append(i)
            held = 0
        held += n * entry_bytes
    return list(zip(bounds, bounds[1:] + [len(sizes)]))


SCAN_QUERY_BLOCK = 512  # queries per product in scan_lists: a block x list-length score matrix (a hot list of
# 2,000 passages: 4 MB), whatever the number of queries that probe the list


class ListProbers:
    """The queries that probe each list: ``probes`` (queries x nprobe list numbers, -1: none) grouped by list."""

    def __init__(self, probes: np.ndarray, nlist: int):
        pairs = probes.ravel()
        order = np.argsort(pairs, kind="stable")
        self.queries = (order // probes.shape[1]).astype(np.int64)  # query rows, grouped by list
        self.starts = np.searchsorted(pairs[order], np.arange(nlist + 1))

    def any(self, lo: int, hi: int) -> bool:
        return bool(self.starts[hi] > self.starts[lo])

    def of(self, lst: int) -> np.ndarray:
        return self.queries[self.starts[lst] : self.starts[lst + 1]]


def scan_lists(invlists, lo: int, hi: int, query_vecs, probers: ListProbers, best) -> None:
    """Lists ``lo..hi`` of a pool's ivf (``invlists``: the piece holding them, list ``lo`` its first) scanned
    list-major: each list's vectors are read once and multiplied by the queries that probe it (one BLAS
    product), and the scores go into ``best``, a ``faiss.ResultHeap`` (keep_max) of each query's best
    candidates kept across lists and pieces, so that a query's threshold (its kk-th best) carries over from
    piece to piece. A candidate is noted as where it sits in the lists, ``list << 32 | place in the list``
    (the heap's ids; one row of them serves every query of the list), so that :func:`rescore_entries`
    reads its vector and id back from the pieces. faiss's query-major ``search_preassigned`` per piece starts
    a fresh heap for each piece a query probes: measured at 1M records, 16 pieces a pool, 1.5x the search time
    of one piece; this scan 1.1x (docs/bench_scale.md). The heap's C++ insertion replaced an argpartition and a
    merge per list in numpy (~30 calls a list; measured 2026-12-08, docs/bench_scale.md)."""
    import faiss

    dim = query_vecs.shape[1]
    invlists = faiss.downcast_InvertedLists(invlists)
    for lst in range(lo, hi):
        probing, n = probers.of(lst), invlists.list_size(lst - lo)
        if not len(probing) or not n:
            continue
        vecs = list_vectors(invlists, lst - lo, n, dim)
        places = (lst << 32) | np.arange(n, dtype=np.int64)
        for b in range(0, len(probing), SCAN_QUERY_BLOCK):  # a block of queries: the score matrix stays small
            rows = probing[b : b + SCAN_QUERY_BLOCK]
            best.add_result_subset(rows, query_vecs[rows] @ vecs.T, places)  # one BLAS product, one heap update


def list_vectors(invlists, lst: int, n: int, dim: int) -> np.ndarray:
    """The ``n`` float32 vectors of list ``lst`` of an IVFFlat's inverted lists, as a view of faiss's memory."""
    import faiss

    return faiss.rev_swig_ptr(invlists.get_codes(lst), n * dim * 4).view(np.float32).reshape(n, dim)


def rescore_entries(
    folder: Path, pieces: list[dict], query_vecs: np.ndarray, entries: np.ndarray, block: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """The ids (the pieces' ``shard << SHARD_BITS | row``; -1: none) and :func:`exact_scores` (-inf: none) of
    each query's candidates (``entries``, n x kk: ``list << 32 | place``, -1: none), their vectors and ids
    read from the pool's ivf pieces, which hold each passage's vector as float32 (the pool's float16 vectors
    converted exactly): the scores :func:`rescore` computes from the pool's shards, without a read per
    scattered row. A piece is mapped while its candidates are read and then unmapped, so the job holds one
    piece at most; a mine job's candidates fall in most lists of a large pool, and reading them from the
    shards cost one ``pread`` each (measured 2026-12-07, one thread, 12k queries, k = 40: the whole search
    2.5 -> 2.0 s at 100k records, 3.3 -> 2.5 s at 1M)."""
    import faiss

    kk, dim = entries.shape[1], query_vecs.shape[1]
    ids = np.full(entries.shape, -1, dtype=np.int64)
    scores = np.full(entries.shape, -np.inf, dtype=np.float32)
    flat = entries.ravel()
    slots = np.flatnonzero(flat >= 0)
    slots = slots[np.argsort(flat[slots] >> 32, kind="stable")]  # grouped by list
    lists = flat[slots] >> 32
    for piece in pieces:
        lo, hi = piece["lists"]
        starts = np.searchsorted(lists, np.arange(lo, hi + 1))  # each list's candidates: slots[starts[i]:starts[i + 1]]
        if starts[0] == starts[-1]:
            continue
        index = faiss.read_index(str(folder / piece["file"]), faiss.IO_FLAG_ONDISK_SAME_DIR)
        invlists = faiss.downcast_InvertedLists(index.invlists)
        for i in np.flatnonzero(np.diff(starts)).tolist():  # the piece's lists holding candidates
            n = invlists.list_size(i)
            vecs, found = list_vectors(invlists, i, n, dim), faiss.rev_swig_ptr(invlists.get_ids(i), n)
            for c in range(starts[i], starts[i + 1], block):  # a hot list: blocks of candidates
                these = slots[c : min(c + block, starts[i + 1])]
                places = flat[these] & 0xFFFFFFFF
                ids.flat[these] = found[places]
                scores.flat[these] = exact_scores(vecs[places], query_vecs[these // kk])
        del invlists, index  # unmaps the piece
    return ids, scores


def release_list_pages(invlists) -> None:
    """:func:`kalm.io.release_pages` for faiss's memory-mapped inverted lists (read with IO_FLAG_MMAP: an
    OnDiskInvertedLists, its map at ``ptr``): madvise DONTNEED. No-op for in-memory lists."""
    import mmap

    size, advice = getattr(invlists, "totsize", 0), getattr(mmap, "MADV_DONTNEED", None)
    if size and advice is not None and hasattr(invlists, "ptr"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(int(invlists.ptr), size, advice)


def write_ivf(pools_dir: str, name: str, scan_mib: float = IndexConfig.scan_mib) -> int:
    """``kalm mine --step ivf``: pool ``name``'s shard IVFs (one quantizer) merged list by list on disk, in
    pieces of consecutive lists of at most ``scan_mib`` MiB (:func:`list_pieces`): each piece an on-disk IVF
    (``piece<p>.faiss`` + ``lists<p>.ivfdata``, faiss's OnDiskInvertedLists.merge_from_multiple over
    SliceInvertedLists of the shards), the pool's quantizer beside them and ``pieces.json``, in
    ``<pool>/ivf``. The shards are memory-mapped and their pages released after each piece, so the job
    holds about one piece whatever the pool's size. Returns the passages indexed."""
    import faiss

    folder = Path(pools_dir) / name
    shards = read_json(folder / RANGES_FILE)["shards"]
    files = [str(f) for j in range(shards) if (f := shard_folder(folder, j) / "index.faiss").exists()]
    quantizer = faiss.read_index(str(folder / QUANTIZER_FILE))
    ivf = faiss.extract_index_ivf(quantizer)
    indexes = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in files]
    lists = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(x).invlists) for x in indexes]
    sizes = np.zeros(ivf.nlist, dtype=np.int64)
    for il in lists:
        sizes += np.fromiter((il.list_size(i) for i in range(ivf.nlist)), np.int64, ivf.nlist)
    pieces = []
    with atomic_path(folder / IVF_DIR, is_dir=True) as tmp:
        faiss.write_index(quantizer, str(tmp / QUANTIZER_FILE))
        for lo, hi in list_pieces(sizes, ivf.code_size + 8, scan_mib * 2**20):
            n = int(sizes[lo:hi].sum())
            if not n:  # faiss cannot map an empty list file; its lists have nothing to scan
                continue
            p = len(pieces)
            out = faiss.OnDiskInvertedLists(hi - lo, ivf.code_size, str(tmp / f"lists{p}.ivfdata"))
            parts = faiss.InvertedListsPtrVector()
            slices = [faiss.SliceInvertedLists(il, lo, hi) for il in lists]
            for sl in slices:
                parts.push_back(sl)
            out.merge_from_multiple(parts.data(), parts.size(), False, False)
            piece = faiss.IndexIVFFlat(faiss.IndexFlatIP(ivf.d), ivf.d, hi - lo, faiss.METRIC_INNER_PRODUCT)
            piece.replace_invlists(out, True)
            out.this.disown()  # the piece owns its lists now
            piece.ntotal, piece.is_trained = n, True
            faiss.write_index(piece, str(tmp / f"piece{p}.faiss"))
            del piece, out, slices  # unmaps the piece's file
            for il in lists:
                release_list_pages(il)
            pieces.append({"file": f"piece{p}.faiss", "lists": [lo, hi], "passages": n})
        total = int(sizes.sum())
        write_json(
            tmp / IVF_PIECES,
            {"lists": ivf.nlist, "passages": total, "scan_mib": scan_mib, "pieces": pieces},
        )
    log.info(
        "pool %s: %d passages of %d shards in %d on-disk pieces of at most %s MiB",
        name,
        total,
        len(files),
        len(pieces),
        scan_mib,
    )
    return total


def read_ivf_pieces(folder: str | Path) -> dict:
    """The pieces of a pool's merged ivf (``<pool>/ivf/pieces.json``, :func:`write_ivf`)."""
    path = Path(folder) / IVF_PIECES
    if not path.exists():
        raise FileNotFoundError(f"{path}: no merged ivf index (run `kalm mine --step ivf` for this pool)")
    return read_json(path)


RANGES_DIR = "ranges"  # a pool's passages scattered by text range: r{j}.parquet, what mine_index job j reads


def _range_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("text", pa.large_string()),
            ("raw", pa.large_string()),
            ("rid", pa.int64()),
            ("place", pa.int32()),
            ("digest", pa.uint64()),  # text_digest(text): the quantizer's sample is drawn on it, no text read
        ]
    )


def scatter_passages(
    inputs,
    mine_tasks: dict[str, bool],
    pools_dir: str,
    name: str,
    bounds: list[str],
    pool: str,
    s: MineSettings,
    batch: int = 65536,
    shards: int | None = None,
) -> list[int]:
    """One pass over the records: every candidate passage of pool ``name`` (encoder-side text, raw text,
    record id, place) appended to the file of its text range, ``<pool>/ranges/r{j}.parquet``, so that each
    mine_index job reads its own range only (a scatter, as the exact dedup's). Returns the rows per range."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = shards or len(bounds) + 1  # an empty pool has no boundaries but still its ranges (all empty)
    schema = _range_schema()
    per_range = max(1024, batch // shards)  # at most ~``batch`` passages buffered over all ranges
    counts = [0] * shards
    with atomic_path(Path(pools_dir) / name / RANGES_DIR, is_dir=True) as tmp:
        writers = [pq.ParquetWriter(tmp / f"r{j}.parquet", schema, compression="zstd") for j in range(shards)]
        buffers: list[list[tuple]] = [[] for _ in range(shards)]

        def flush(j):
            cols = list(zip(*buffers[j])) if buffers[j] else [[] for _ in schema]
            writers[j].write_table(pa.table([pa.array(c, t.type) for c, t in zip(cols, schema)], schema=schema))
            buffers[j].clear()

        for _, formatted, raw, (rid, place) in _pool_passages(
            inputs, mine_tasks, pool, name, s.query_instruction, s.passage_instruction
        ):
            j = shard_of_text(formatted, bounds)
            buffers[j].append((formatted, raw, rid, place, text_digest(formatted)))
            counts[j] += 1
            if len(buffers[j]) >= per_range:
                flush(j)
        for j in range(shards):
            if buffers[j] or not counts[j]:
                flush(j)
            writers[j].close()
    log.info("pool %s: %d passages scattered into %d ranges %s", name, sum(counts), shards, counts)
    return counts


def _range_passages(pools_dir: str, name: str, shard: int):
    """(encoder-side text, raw text, order) of the passages scattered to range ``shard`` of pool ``name``."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(Path(pools_dir) / name / RANGES_DIR / f"r{shard}.parquet")
    for b in pf.iter_batches(batch_size=65536):
        for text, raw, rid, place in zip(*(b.column(c).to_pylist() for c in ("text", "raw", "rid", "place"))):
            yield text, raw, (rid, place)


def shard_of_text(text: str, boundaries: list[str]) -> int:
    """The pool shard whose text range holds ``text`` (ranges.json's rule)."""
    import bisect

    return bisect.bisect_right(boundaries, text)


def write_pools(
    inputs,
    shard_paths: list[str],
    mine_tasks: dict[str, bool],
    pools_dir: str,
    *,
    pool: str = "task",
    only: str | None = None,
    shard: int | None = None,
    index: IndexConfig | None = None,
    settings: MineSettings | None = None,
) -> list[str]:
    """``kalm mine --step pool``: build and save the pool shards (``only``: one pool; ``shard``: one of its
    text ranges) under ``pools_dir``, each from its range's scattered passages (:func:`write_ranges`; without
    a ranges.json: a single range, written here first). ivf: the pool's quantizer is trained first when
    missing (:func:`train_quantizer`), and with every shard built here they are merged (:func:`write_ivf`)."""
    s = settings or MineSettings()
    k = s.search_k(10**18) + RESCORE_EXTRA
    ivf = index is not None and index.type == "ivf"
    names = pool_names(mine_tasks, pool, only)
    ranges = {}
    for name in names:
        f = Path(pools_dir) / name / RANGES_FILE
        if not f.exists():
            if not inputs:
                raise ValueError(f"{f}: no ranges (run --step ranges first, or give --input)")
            write_ranges(inputs, mine_tasks, pools_dir, 1, pool=pool, only=name, settings=s, index=index)
        ranges[name] = read_json(f)
        if ivf and not (f.parent / QUANTIZER_FILE).exists():
            train_quantizer(pools_dir, name, shard_paths, index)
        if shard is not None and not 0 <= shard < ranges[name]["shards"]:
            raise ValueError(f"{f}: pool {name} has {ranges[name]['shards']} shards, no shard {shard}")
    written = []
    for name in names:
        folder = Path(pools_dir) / name
        quantizer = folder / QUANTIZER_FILE if ivf else None
        for j in range(ranges[name]["shards"]) if shard is None else [shard]:
            b = PoolBuilder()  # a range without passages: an empty shard
            for formatted, raw, order in _range_passages(pools_dir, name, j):
                b.add(formatted, raw, order)
            n = b.save(
                shard_folder(folder, j), None, shard_paths, index, k, f"{name}/shard{j}", quantizer=quantizer, shard=j
            )
            log.info("pool %s shard %d/%d: %d passages", name, j, ranges[name]["shards"], n)
            written.append(f"{name}/shard{j}")
        if ivf and shard is None:  # every shard written here: merge them (the workflow: rule mine_ivf)
            write_ivf(pools_dir, name, index.scan_mib)
    return written


def _new_stats(s: MineSettings, pool: str, index_cfg: IndexConfig) -> StageStats:
    return StageStats(
        "mine",
        window=list(s.window),
        negative_number=s.negative_number,
        filter_topk=s.filter_topk,
        margin_ratio=s.margin_ratio,
        pad=s.pad,
        sampling=s.sampling,
        pool=pool,
        index=index_cfg.type,
        given_negatives=s.given_negatives,
        candidates_in_window=0,
        candidates_equal_to_positive_or_query=0,
        candidates_equal_to_given_negative=0,
        candidates_repeated=0,
        candidates_over_margin=0,
        given_negatives_seen=0,
        given_negatives_kept=0,
        given_negatives_equal_to_positive_or_query=0,
        given_negatives_duplicate=0,
        given_negatives_truncated=0,
        given_negatives_replaced=0,
        negatives_from_window=0,
        negatives_padded_random=0,
        records_short_of_negatives=0,
    )


def mine_shard(
    input_path,
    shard_paths: list[str],
    mine_tasks: dict[str, bool],
    pools_dir: str,
    out_path: str,
    stats_path: str,
    s: MineSettings,
    pool: str = "task",
    index: IndexConfig | None = None,
) -> StageStats:
    """``kalm mine --step apply``: mine one query shard against its tasks' whole pools (from ``pools_dir``).

    Memory: one task's records of this shard at a time, the vectors of one block of their texts (looked up
    by digest in the memory-mapped embedding shards), and one pool (memory-mapped texts and vectors, 8 bytes
    of key hash a passage) with the index of one of its shards at a time (``mine.pool_shards``)."""
    s.check()
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, not {pool!r}")
    index_cfg = index or IndexConfig()
    stats = _new_stats(s, pool, index_cfg)
    counts = task_counts(input_path)
    mined = sorted(t for t in counts if t in mine_tasks)
    k = s.search_k(10**18)  # the index's k before the pool size caps it (HNSW efSearch, faiss-gpu's limit)
    loaded: tuple[str, PoolShards] | None = None
    store = ShardedEmbeddings(shard_paths)  # this shard's texts are looked up by digest, a block at a time
    with record_writer(out_path) as out:
        for task in mined:
            recs = list(iter_task_records(input_path, {task}, RECORD_COLUMNS))
            stats.seen(len(recs), task=task)
            texts = [mining_texts(r, mine_tasks[task], s.query_instruction, s.passage_instruction) for r in recs]
            name = pool_name(task, pool)
            if loaded is None or loaded[0] != name:
                loaded = None  # one pool alive at a time
                loaded = (name, PoolShards(Path(pools_dir) / name, index_cfg, k + RESCORE_EXTRA))
                log.info(
                    "pool %s: %d passages in %d shards (%s index)",
                    name,
                    loaded[1].size,
                    len(loaded[1].shards),
                    index_cfg.type,
                )
            log.info("mining %s: %d records", task, len(recs))
            for rec in mine_records(recs, texts, loaded[1], store, s, stats):
                out.write(rec)
            del recs, texts
        passthrough = {t for t in counts if t not in mine_tasks}
        if passthrough:
            for rec in iter_task_records(
                input_path, passthrough, RECORD_COLUMNS + ["neg_ranks", "neg_scores", "pos_score"]
            ):
                stats.seen(task=rec["task"])
                out.write(rec)
                stats.keep(task=rec["task"])
    stats.write(stats_path)
    log.info("mined %s: %d in, %d kept, dropped %s", input_path, stats.n_in, stats.kept, stats.dropped)
    return stats


def merge(stats_paths: list[str], stats_out: str) -> dict:
    """Gather of the query shards' stats: counts summed, settings copied (kalm.io.merge_stats)."""
    merged = merge_stats(stats_paths, settings=SETTINGS)
    write_json(stats_out, merged)
    return merged


def mine(
    input_path,
    shard_paths: list[str],
    mine_tasks: dict[str, bool],
    out_path: str,
    stats_path: str,
    *,
    window: tuple[int, int] = (50, 100),
    negative_number: int = 7,
    filter_topk: int | None = 50,
    pad: str = "random",
    seed: int = 0,
    sampling: str = "random",
    margin_ratio: float | None = None,
    pool: str = "task",
    index: IndexConfig | None = None,
    query_batch: int = 4096,
    query_instruction: bool = True,
    passage_instruction: str = "symmetric",
    given_negatives: str = "keep",
    pool_shards: int = 1,
) -> StageStats:
    """Mine ``input_path`` (one or several record files) in one call (``--step all``): the pools go
    through a temporary folder, as in the sharded workflow, so both run the same code."""
    s = MineSettings(
        window=tuple(window),
        negative_number=negative_number,
        filter_topk=filter_topk,
        margin_ratio=margin_ratio,
        pad=pad,
        sampling=sampling,
        seed=seed,
        query_batch=query_batch,
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        given_negatives=given_negatives,
    )
    s.check()
    with tempfile.TemporaryDirectory(prefix="kalm-mine-pools-") as d:
        write_ranges(input_path, mine_tasks, d, pool_shards, pool=pool, settings=s, index=index)
        write_pools(input_path, shard_paths, mine_tasks, d, pool=pool, index=index, settings=s)
        return mine_shard(input_path, shard_paths, mine_tasks, d, out_path, stats_path, s, pool, index)


def settings_of(c: MineConfig) -> tuple[MineSettings, IndexConfig]:
    """The sampling settings and the index of a stage's options."""
    s = MineSettings(
        window=tuple(c.range_for_sampling),
        negative_number=c.negative_number,
        filter_topk=c.filter_topk or None,
        margin_ratio=c.margin_ratio,
        pad=c.pad,
        sampling=c.sampling,
        seed=c.seed,
        query_batch=c.query_batch,
        query_instruction=c.query_instruction,
        passage_instruction=c.passage_instruction,
        given_negatives=c.given_negatives,
    )
    index = IndexConfig(
        type=c.index_type,
        nlist=c.nlist,
        nprobe=c.nprobe,
        list_size=c.list_size,
        scan_mib=c.scan_mib,
        hnsw_m=c.hnsw_m,
        ef_search=c.ef_search,
    )
    return s, index


def mine_config(args: argparse.Namespace) -> MineConfig:
    """MineConfig from ``--options`` (JSON {field: value}: kalm.options.options_json of the config's ``mine``
    section) and the flags given, which win."""
    base = json.loads(args.options) if args.options else None
    c = options.from_args(MineConfig, args, base)
    if len(c.range_for_sampling) != 2:
        raise SystemExit(f"kalm mine: range_for_sampling must be [lo, hi), got {list(c.range_for_sampling)}")
    return c


def _run(args: argparse.Namespace) -> None:
    c = mine_config(args)
    s, index = settings_of(c)
    need = {
        "all": ("input", "embeddings", "mine_tasks", "out", "stats"),
        "ranges": ("input", "mine_tasks", "pools_dir"),
        "quantizer": ("embeddings", "mine_tasks", "pools_dir"),
        "ivf": ("mine_tasks", "pools_dir"),
        "pool": ("embeddings", "mine_tasks", "pools_dir"),  # --input only without a ranges step
        "apply": ("input", "embeddings", "mine_tasks", "pools_dir", "out", "stats"),
        "merge": ("input", "stats"),
    }[args.step]
    missing = [f"--{n.replace('_', '-')}" for n in need if not getattr(args, n)]
    if missing:
        raise SystemExit(f"kalm mine --step {args.step}: {', '.join(missing)} required")
    if args.step == "merge":
        merge(args.input, args.stats)
        return
    mine_tasks = json.loads(args.mine_tasks)
    if args.step == "ranges":
        write_ranges(
            args.input,
            mine_tasks,
            args.pools_dir,
            c.pool_shards,
            pool=c.pool,
            only=args.only_pool,
            settings=s,
            index=index,
        )
    elif args.step in ("quantizer", "ivf"):
        if index.type != "ivf":
            raise SystemExit(f"kalm mine --step {args.step}: only for index type ivf, not {index.type}")
        for name in pool_names(mine_tasks, c.pool, args.only_pool) or [args.only_pool]:
            if args.step == "quantizer":
                train_quantizer(args.pools_dir, name, args.embeddings, index)
            else:
                write_ivf(args.pools_dir, name, index.scan_mib)
    elif args.step == "pool":
        s.check()
        write_pools(
            args.input,
            args.embeddings,
            mine_tasks,
            args.pools_dir,
            pool=c.pool,
            only=args.only_pool,
            shard=args.pool_shard,
            index=index,
            settings=s,
        )
    elif args.step == "apply":
        if len(args.input) != 1:
            raise SystemExit("kalm mine --step apply: one --input query shard")
        mine_shard(
            args.input[0],
            args.embeddings,
            mine_tasks,
            args.pools_dir,
            args.out,
            args.stats,
            s,
            c.pool,
            index,
        )
    else:
        mine(
            args.input,
            args.embeddings,
            mine_tasks,
            args.out,
            args.stats,
            window=s.window,
            negative_number=s.negative_number,
            filter_topk=s.filter_topk,
            pad=s.pad,
            seed=s.seed,
            sampling=s.sampling,
            margin_ratio=s.margin_ratio,
            pool=c.pool,
            index=index,
            query_batch=s.query_batch,
            query_instruction=s.query_instruction,
            passage_instruction=s.passage_instruction,
            given_negatives=s.given_negatives,
            pool_shards=c.pool_shards,
        )


def register(sub) -> None:
    p = sub.add_parser("mine", help="FAISS search, negative sampling and ranking-consistency filter")
    p.add_argument(
        "--step",
        choices=["all", "ranges", "quantizer", "pool", "ivf", "apply", "merge"],
        default="all",
        help="all: pools + mining of --input in one run; ranges: split each pool (--only-pool: one) into "
        "--pool-shards text ranges (its ranges.json and bottom-k sample under --pools-dir); quantizer (ivf): "
        "train each pool's coarse quantizer on its sample; pool: build the pool shards (--pool-shard: one); "
        "ivf: merge a pool's shard lists on disk (pieces of index.scan_mib); apply: mine one query shard against them; "
        "merge: add up the query shards' stats (--input) into --stats",
    )
    p.add_argument("--input", nargs="+", help="records (.parquet shards or .jsonl); --step merge: the shards' stats")
    p.add_argument("--embeddings", nargs="+", help="shard*.npy files from `kalm embed`")
    p.add_argument("--mine-tasks", help='JSON {"task": symmetric_bool}')
    p.add_argument("--pools-dir", help="folder of the candidate pools, one subfolder per pool (a task, or 'global')")
    p.add_argument("--only-pool", help="--step ranges / pool: only this pool (a task name, or 'global')")
    p.add_argument("--pool-shard", type=int, help="--step pool: build only this shard of the pool")
    p.add_argument("--out")
    p.add_argument("--stats")
    p.add_argument(
        "--options",
        help="the config's mine section as JSON (MineConfig's keys); flags given as well win over it",
    )
    options.add_arguments(p, MineConfig)
    p.set_defaults(func=_run)
