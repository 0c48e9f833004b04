"""FAISS hard-negative mining with ranking-consistency filtering (KaLM / FlagEmbedding hn_mine).

For every record of a mined task, the candidate pool is the set of passages of that task.
The query is searched against the pool with exact inner product (embeddings are L2
normalised, so this is cosine similarity), and then:

1. ranking-consistency filter: the record is dropped when its best positive scores below the
   candidate at rank ``filter_topk`` (1-based), i.e. the retriever disagrees with the label;
2. negatives are sampled from the rank window ``[lo, hi)`` (0-based ranks), skipping any
   candidate whose normalised text equals a positive or the query (``sampling="top"`` takes
   the best-ranked ones instead: then the candidate lists equal sentence-transformers'
   ``mine_hard_negatives(..., sampling_strategy="top")``, a test);
3. when fewer than ``negative_number`` survive, the rest is padded with random pool passages
   (``pad="random"``) or left short (``pad="none"``); both are counted.

Mined records keep their fields and gain ``neg``, ``neg_ranks``, ``neg_scores`` and
``pos_score``. Records of tasks that are not mined (e.g. classification with given label
negatives) pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict

import numpy as np

from kalm.embed import load_shards, mining_texts
from kalm.io import StageStats, atomic_path, read_jsonl
from kalm.text import dedup_key

log = logging.getLogger(__name__)


def build_index(vectors: np.ndarray):
    """Exact inner-product index; on GPU when faiss-gpu sees one (same results as CPU)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def mine_task(records: list[dict], matrix: np.ndarray, row: dict[str, int], symmetric: bool, *,
              window: tuple[int, int], negative_number: int, filter_topk: int | None, pad: str,
              seed: int, stats: StageStats, sampling: str = "random", query_batch: int = 1024) -> list[dict]:
    task = records[0]["task"]
    pool: list[str] = []  # encoder-side texts (formatted)
    raw_of: dict[str, str] = {}  # formatted -> raw passage text
    texts = [mining_texts(rec, symmetric) for rec in records]  # (query, passages) as the encoder saw them
    for rec, (_, passages) in zip(records, texts):
        for formatted, raw in zip(passages, rec["pos"] + rec.get("neg", [])):
            if formatted not in raw_of:
                raw_of[formatted] = raw
                pool.append(formatted)
    pool_vecs = matrix[[row[t] for t in pool]]
    index = build_index(pool_vecs)
    lo, hi = window
    k = min(len(pool), max(hi, filter_topk or 0))
    query_vecs = matrix[[row[query] for query, _ in texts]]
    out = []
    for start in range(0, len(records), query_batch):
        scores, ids = index.search(np.ascontiguousarray(query_vecs[start:start + query_batch]), k)
        for j, rec in enumerate(records[start:start + query_batch]):
            i = start + j
            rng = random.Random(f"{seed}:{task}:{i}")
            pos_keys = {dedup_key(p) for p in rec["pos"]}
            pos_score = max(float(query_vecs[i] @ matrix[row[t]]) for t in texts[i][1][:len(rec["pos"])])
            if filter_topk and len(pool) >= filter_topk and pos_score < scores[j, filter_topk - 1]:
                stats.drop("ranking_inconsistent", task=task)
                continue
            banned = pos_keys | {dedup_key(rec["query"])}
            window_cands = [(r, int(ids[j, r]), float(scores[j, r])) for r in range(lo, min(hi, k))
                            if ids[j, r] >= 0 and dedup_key(raw_of[pool[ids[j, r]]]) not in banned]
            if sampling == "top":  # deterministic: the best-ranked candidates of the window
                picked = window_cands[:negative_number]
            else:
                picked = rng.sample(window_cands, min(negative_number, len(window_cands)))
            stats.extra["negatives_from_window"] += len(picked)
            missing = negative_number - len(picked)
            if missing and pad == "random":
                used = {c[1] for c in picked}
                others = [x for x in range(len(pool)) if x not in used and dedup_key(raw_of[pool[x]]) not in banned]
                for x in rng.sample(others, min(missing, len(others))):
                    picked.append((-1, x, float(query_vecs[i] @ pool_vecs[x])))
                stats.extra["negatives_padded_random"] += min(missing, len(others))
            if len(picked) < negative_number:
                stats.extra["records_short_of_negatives"] += 1
            mined = dict(rec)
            mined["neg"] = [raw_of[pool[x]] for _, x, _ in picked]
            mined["neg_ranks"] = [r for r, _, _ in picked]  # -1 marks a random pad
            mined["neg_scores"] = [round(s, 6) for _, _, s in picked]
            mined["pos_score"] = round(pos_score, 6)
            out.append(mined)
            stats.keep(task=task)
    return out


def mine(input_path: str, shard_paths: list[str], mine_tasks: dict[str, bool], out_path: str, stats_path: str, *,
         window: tuple[int, int] = (50, 100), negative_number: int = 7, filter_topk: int | None = 50,
         pad: str = "random", seed: int = 0, sampling: str = "random") -> StageStats:
    if sampling not in ("random", "top"):
        raise ValueError(f"sampling must be 'random' or 'top', not {sampling!r}")
    matrix, row = load_shards(shard_paths)
    stats = StageStats("mine", window=list(window), negative_number=negative_number, filter_topk=filter_topk,
                       pad=pad, sampling=sampling, negatives_from_window=0, negatives_padded_random=0, records_short_of_negatives=0)
    by_task: dict[str, list[dict]] = defaultdict(list)
    passthrough = []
    for rec in read_jsonl(input_path):
        stats.seen(task=rec["task"])
        (by_task[rec["task"]] if rec["task"] in mine_tasks else passthrough).append(rec)
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for task in sorted(by_task):
            log.info("mining %s: %d records", task, len(by_task[task]))
            for rec in mine_task(by_task[task], matrix, row, mine_tasks[task], window=window,
                                 negative_number=negative_number, filter_topk=filter_topk, pad=pad,
                                 seed=seed, stats=stats, sampling=sampling):
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        for rec in passthrough:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            stats.keep(task=rec["task"])
    stats.write(stats_path)
    return stats


def _run(args: argparse.Namespace) -> None:
    mine(args.input, args.embeddings, json.loads(args.mine_tasks), args.out, args.stats,
         window=tuple(args.range), negative_number=args.negative_number,
         filter_topk=args.filter_topk or None, pad=args.pad, seed=args.seed, sampling=args.sampling)


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
    p.add_argument("--pad", choices=["random", "none"], default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=["random", "top"], default="random",
                   help="random: sample the window (KaLM); top: its best-ranked candidates")
    p.set_defaults(func=_run)
