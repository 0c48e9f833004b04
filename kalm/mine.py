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
chunk by chunk, into the index (see README "Memory bound").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from kalm.embed import ShardedEmbeddings, add_instruction_args, mining_texts
from kalm.io import StageStats, atomic_path, read_jsonl
from kalm.text import dedup_key

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "flat_fp16", "ivf", "hnsw")
GIVEN_NEGATIVES = ("keep", "replace")
PAD_RANK = -1  # neg_ranks marker: a random pad
GIVEN_RANK = -2  # neg_ranks marker: a negative the record came with (given_negatives="keep")
GPU_MAX_K = 2048  # faiss-gpu's largest k


@dataclass
class IndexConfig:
    type: str = "flat"
    nlist: int | None = None  # ivf: None = 4 sqrt(N)
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 256
    ef_construction: int = 80
    use_gpu: bool | None = None  # None: when faiss-gpu sees a GPU


def _num_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(vectors: np.ndarray | ShardedEmbeddings, cfg: IndexConfig | None = None, texts=None,
                k: int = 100, add_chunk: int = 65536):
    """An inner-product index over ``vectors`` (or over ``texts`` of a sharded store), added in chunks."""
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
        nlist = max(1, min(cfg.nlist or int(4 * math.sqrt(n)), n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
        train_n = min(n, 64 * nlist)  # faiss wants >= 39 points per centroid; 64 is plenty
        sample = np.sort(np.random.default_rng(0).choice(n, train_n, replace=False))
        train = vectors.vectors([texts[i] for i in sample]) if texts is not None else \
            np.ascontiguousarray(vectors[sample], dtype=np.float32)
        index.train(train)
        index.nprobe = min(cfg.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = max(cfg.ef_search, k)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else _num_gpus() > 0
    if use_gpu and cfg.type != "hnsw" and k <= GPU_MAX_K:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = cfg.type == "flat_fp16"
        options.shard = True  # split the database across GPUs (memory), merge results
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    elif use_gpu:
        log.info("index %s with k=%d stays on CPU (faiss-gpu: no HNSW, k <= %d)", cfg.type, k, GPU_MAX_K)
    for start in range(0, n, add_chunk):
        index.add(chunk(start, start + add_chunk))
    return index


@dataclass
class Pool:
    """Candidate passages: encoder-side texts, their raw texts and normalised-text keys."""

    texts: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)

    def add(self, formatted: str, raw: str) -> None:
        if formatted not in self.seen:
            self.seen[formatted] = len(self.texts)
            self.texts.append(formatted)
            self.raw.append(raw)

    def finish(self) -> None:
        """Integer key per passage: candidates equal to a positive/query are found by key."""
        self.key_id: dict[str, int] = {}
        self.keys = np.array([self.key_id.setdefault(dedup_key(r), len(self.key_id)) for r in self.raw], dtype=np.int64)


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
    distinct keys (``banned``: key ids, updated)."""
    picked: list[int] = []
    for _ in range(20 * missing + 20):  # a big pool: a few draws; a tiny one falls back below
        if len(picked) == missing:
            return picked
        x = rng.randrange(len(pool.texts))
        if x not in used and pool.keys[x] not in banned:
            used.add(x)
            banned.add(int(pool.keys[x]))
            picked.append(x)
    rest = [x for x in range(len(pool.texts)) if x not in used and pool.keys[x] not in banned]
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
    for raw, formatted in zip(given, passages[len(rec["pos"]):]):
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


def mine_records(records: list[dict], texts: list[tuple[str, list[str]]], pool: Pool, index,
                 store: ShardedEmbeddings, s: MineSettings, stats: StageStats) -> list[dict]:
    """Mine negatives for ``records`` (one task) whose encoder-side texts are ``texts``."""
    task = records[0]["task"]
    lo, hi = s.window
    k = s.search_k(len(pool.texts))
    out = []
    for start in range(0, len(records), s.query_batch):
        recs, txts = records[start:start + s.query_batch], texts[start:start + s.query_batch]
        query_vecs = store.vectors([q for q, _ in txts])
        scores, ids = index.search(query_vecs, k)
        for j, (rec, (_, passages)) in enumerate(zip(recs, txts)):
            i = start + j
            rng = random.Random(f"{s.seed}:{task}:{i}")
            pos_scores = store.vectors(passages[:len(rec["pos"])]) @ query_vecs[j]
            pos_score = float(pos_scores.max())
            if s.filter_topk and k > s.filter_topk and pos_score < scores[j, s.filter_topk]:
                stats.drop("ranking_inconsistent", task=task)
                continue
            given = given_negatives(rec, passages, s, stats)
            given_scores = store.vectors([f for _, f in given]) @ query_vecs[j] if given else []
            banned = {pool.key_id[key] for key in map(dedup_key, rec["pos"] + [rec["query"]]) if key in pool.key_id}
            banned_given = {pool.key_id[key] for key in (dedup_key(r) for r, _ in given) if key in pool.key_id}
            banned_given -= banned
            cand_ids, cand_scores = ids[j, lo:min(hi, k)], scores[j, lo:min(hi, k)]
            valid = cand_ids >= 0
            cand_ids, cand_scores, ranks = cand_ids[valid], cand_scores[valid], np.arange(lo, min(hi, k))[valid]
            cand_keys = pool.keys[cand_ids]
            equal = np.isin(cand_keys, list(banned))
            equal_given = np.isin(cand_keys, list(banned_given))
            repeated = np.ones(len(cand_ids), bool)  # same normalised text as a better-ranked candidate
            repeated[np.unique(cand_keys, return_index=True)[1]] = False
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
                pad_scores = store.vectors([pool.texts[x] for x in pads]) @ query_vecs[j] if pads else []
                picked += [(PAD_RANK, x, float(sc)) for x, sc in zip(pads, pad_scores)]
                stats.extra["negatives_padded_random"] += len(pads)
            if len(given) + len(picked) < s.negative_number:
                stats.extra["records_short_of_negatives"] += 1
            mined = dict(rec)
            mined["neg"] = [r for r, _ in given] + [pool.raw[x] for _, x, _ in picked]
            mined["neg_ranks"] = [GIVEN_RANK] * len(given) + [r for r, _, _ in picked]
            mined["neg_scores"] = [round(float(sc), 6) for sc in given_scores] + [round(sc, 6) for _, _, sc in picked]
            mined["pos_score"] = round(pos_score, 6)
            out.append(mined)
            stats.keep(task=task)
    return out


def mine(input_path: str, shard_paths: list[str], mine_tasks: dict[str, bool], out_path: str, stats_path: str, *,
         window: tuple[int, int] = (50, 100), negative_number: int = 7, filter_topk: int | None = 50,
         pad: str = "random", seed: int = 0, sampling: str = "random", margin_ratio: float | None = None,
         pool: str = "task", index: IndexConfig | None = None, query_batch: int = 4096,
         query_instruction: bool = True, passage_instruction: str = "symmetric",
         given_negatives: str = "keep") -> StageStats:
    s = MineSettings(window=tuple(window), negative_number=negative_number, filter_topk=filter_topk,
                     margin_ratio=margin_ratio, pad=pad, sampling=sampling, seed=seed, query_batch=query_batch,
                     query_instruction=query_instruction, passage_instruction=passage_instruction,
                     given_negatives=given_negatives)
    s.check()
    if pool not in ("task", "global"):
        raise ValueError(f"pool must be 'task' or 'global', not {pool!r}")
    index_cfg = index or IndexConfig()
    t0 = time.time()
    store = ShardedEmbeddings(shard_paths)
    stats = StageStats("mine", window=list(window), negative_number=negative_number, filter_topk=filter_topk,
                       margin_ratio=margin_ratio, pad=pad, sampling=sampling, pool=pool, index=index_cfg.type,
                       given_negatives=given_negatives, candidates_in_window=0,
                       candidates_equal_to_positive_or_query=0, candidates_equal_to_given_negative=0,
                       candidates_repeated=0,
                       candidates_over_margin=0, given_negatives_seen=0, given_negatives_kept=0,
                       given_negatives_equal_to_positive_or_query=0, given_negatives_duplicate=0,
                       given_negatives_truncated=0, given_negatives_replaced=0,
                       negatives_from_window=0, negatives_padded_random=0, records_short_of_negatives=0)
    by_task: dict[str, list[dict]] = defaultdict(list)
    passthrough = []
    for rec in read_jsonl(input_path):
        stats.seen(task=rec["task"])
        (by_task[rec["task"]] if rec["task"] in mine_tasks else passthrough).append(rec)
    texts = {t: [mining_texts(r, mine_tasks[t], query_instruction, passage_instruction) for r in recs]
             for t, recs in by_task.items()}
    pools: dict[str, Pool] = {}
    for task in sorted(by_task):
        p = pools.setdefault("*" if pool == "global" else task, Pool())
        for rec, (_, passages) in zip(by_task[task], texts[task]):
            for formatted, raw in zip(passages, rec["pos"] + rec.get("neg", [])):
                p.add(formatted, raw)
    k = s.search_k(10**18)  # the index's k before the pool size caps it (HNSW efSearch, faiss-gpu's limit)
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        indexes = {}
        for task in sorted(by_task):
            name = "*" if pool == "global" else task
            if name not in indexes:
                pools[name].finish()
                t = time.time()
                indexes = {name: build_index(store, index_cfg, pools[name].texts, k)}  # one index alive at a time
                log.info("index %s over %d passages (%s) in %.1f s", index_cfg.type, len(pools[name].texts), name,
                         time.time() - t)
            log.info("mining %s: %d records", task, len(by_task[task]))
            for rec in mine_records(by_task[task], texts[task], pools[name], indexes[name], store, s, stats):
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        for rec in passthrough:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            stats.keep(task=rec["task"])
    stats.extra["seconds"] = round(time.time() - t0, 3)
    stats.write(stats_path)
    return stats


def _run(args: argparse.Namespace) -> None:
    index = IndexConfig(type=args.index, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_search=args.ef_search)
    mine(args.input, args.embeddings, json.loads(args.mine_tasks), args.out, args.stats,
         window=tuple(args.range), negative_number=args.negative_number,
         filter_topk=args.filter_topk or None, pad=args.pad, seed=args.seed, sampling=args.sampling,
         margin_ratio=args.margin_ratio, pool=args.pool, index=index, query_batch=args.query_batch,
         query_instruction=args.query_instruction, passage_instruction=args.passage_instruction,
         given_negatives=args.given_negatives)


def register(sub) -> None:
    p = sub.add_parser("mine", help="FAISS search, negative sampling and ranking-consistency filter")
    p.add_argument("--input", required=True)
    p.add_argument("--embeddings", nargs="+", required=True, help="shard*.npy files from `kalm embed`")
    p.add_argument("--mine-tasks", required=True, help='JSON {"task": symmetric_bool}')
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--range", type=int, nargs=2, default=[50, 100], metavar=("LO", "HI"))
    p.add_argument("--negative-number", type=int, default=7)
    p.add_argument("--filter-topk", type=int, default=50, help="0 disables the filter")
    p.add_argument("--margin-ratio", type=float, help="TopK-PercPos: keep negatives below ratio x positive score")
    p.add_argument("--pad", choices=["random", "none"], default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=["random", "top"], default="random",
                   help="random: sample the window (KaLM); top: its best-ranked candidates")
    p.add_argument("--given-negatives", choices=GIVEN_NEGATIVES, default="keep",
                   help="keep: a record's own negatives come first, mining fills up to --negative-number (KaLM); "
                        "replace: mine them all")
    p.add_argument("--pool", choices=["task", "global"], default="task", help="candidate pool per task or global")
    p.add_argument("--index", choices=INDEX_TYPES, default="flat")
    p.add_argument("--nlist", type=int, help="ivf: number of lists (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32, help="ivf: lists searched per query")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=256)
    p.add_argument("--query-batch", type=int, default=4096, help="queries per FAISS search call")
    add_instruction_args(p)
    p.set_defaults(func=_run)
