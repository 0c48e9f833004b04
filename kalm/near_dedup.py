"""Near-duplicate removal across the files of a stage: MinHash signatures per shard, LSH gather.

Runs after exact dedup (``kalm.dedup``), which scatters the surviving records round-robin over
``S`` shard files (record ``g`` of the stage goes to shard ``g % S`` at line ``g // S``), so the
stage's input order is recoverable without an index file.

1. ``minhash_shard`` (one Snakemake job per shard): the MinHash signature of each record's text
   (normalised query and sorted positives, :func:`record_text`) to ``uint32[n, num_perm]`` ``.npy``,
   streaming in batches (memory: one batch of texts plus the memory-mapped output).
2. ``near_dedup`` (one gather job): loads the signatures (``4 * num_perm`` bytes per record; the
   records themselves are streamed, never held), computes ``bands x rows`` LSH keys with the
   ``(bands, rows)`` that minimise false positives + false negatives around the threshold, and
   walks the records in input order: a record is dropped as ``near_duplicate`` when an earlier
   *kept* record sharing one of its bands has an estimated Jaccard similarity >= threshold;
   otherwise it is kept. So the first-seen record of each near-duplicate cluster is kept, a
   record with no similar earlier record is never dropped, and running the step again on its own
   output drops nothing (the candidates of a kept record are the same kept records as before).
   Records whose band keys are all unique (most of a corpus) never reach the Python loop.

Library choice (datasketch, rensa, or this): see ``kalm.minhash`` and README "Data stage".
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator

import numpy as np

from kalm.io import StageStats, atomic_path, read_json, read_jsonl
from kalm.minhash import band_keys, optimal_bands, signatures
from kalm.text import dedup_key

log = logging.getLogger(__name__)

BATCH = 4096
N_EXAMPLES = 5


def record_text(rec: dict) -> str:
    """The text whose shingles represent a training record: query and sorted positives, joined by a
    newline and normalised as one string (``dedup_key``: NFKC, whitespace folded, case-folded)."""
    return dedup_key("\n".join([rec["query"], *sorted(rec["pos"])]))


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _batches(it: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(it, size)):
        yield batch


def minhash_shard(input_path: str, out_path: str, num_perm: int = 128, shingle: int = 5, seed: int = 1,
                  batch: int = BATCH) -> int:
    """Write the signatures of one shard's records (in file order); return the record count."""
    n = _count_lines(input_path)
    with atomic_path(out_path) as tmp:
        sigs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint32, shape=(n, num_perm))
        i = 0
        for recs in _batches(read_jsonl(input_path), batch):
            sigs[i:i + len(recs)] = signatures([record_text(r) for r in recs], num_perm, shingle, seed)
            i += len(recs)
            if i // (25 * batch) != (i - len(recs)) // (25 * batch):
                log.info("minhash %s: %d / %d records", input_path, i, n)
        if i != n:
            raise RuntimeError(f"{input_path}: counted {n} records but read {i}")
        sigs.flush()
        del sigs
    log.info("minhash %s: %d records", input_path, n)
    return n


def _interleave(paths: list[str]) -> Iterator[dict]:
    """Records of round-robin shards in the stage's original order."""
    readers = [read_jsonl(p) for p in paths]
    for group in itertools.zip_longest(*readers):
        for rec in group:
            if rec is not None:
                yield rec


def load_signatures(sig_paths: list[str]) -> np.ndarray:
    """Signatures of round-robin shards, in the stage's original order."""
    shards = [np.load(p, mmap_mode="r") for p in sig_paths]
    n = sum(len(s) for s in shards)
    num_perm = shards[0].shape[1] if shards else 0
    out = np.empty((n, num_perm), dtype=np.uint32)
    for i, s in enumerate(shards):
        expected = len(range(i, n, len(shards)))
        if len(s) != expected:
            raise ValueError(f"{sig_paths[i]}: {len(s)} signatures, a round-robin shard {i} of {n} records has {expected}")
        out[i::len(shards)] = s
    return out


def near_duplicates(sigs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (keep mask, index of the kept record each dropped record matched, -1 if kept)."""
    n, num_perm = sigs.shape
    keep = np.ones(n, dtype=bool)
    match = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return keep, match
    bands, rows = optimal_bands(threshold, num_perm)
    keys = band_keys(sigs, bands, rows)
    group = np.empty((n, bands), dtype=np.int32 if n < 2**31 else np.int64)
    shared = np.zeros((n, bands), dtype=bool)
    for b in range(bands):
        _, inv, counts = np.unique(keys[:, b], return_inverse=True, return_counts=True)
        group[:, b] = inv
        shared[:, b] = counts[inv] > 1
    del keys
    members: list[dict[int, list[int]]] = [{} for _ in range(bands)]  # band -> group -> kept records
    for i in np.flatnonzero(shared.any(axis=1)):
        my_bands = np.flatnonzero(shared[i])
        cands = [j for b in my_bands for j in members[b].get(int(group[i, b]), ())]
        if cands:
            cands = np.unique(np.asarray(cands, dtype=np.int64))
            sims = (sigs[cands] == sigs[i]).mean(axis=1)
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                keep[i] = False
                match[i] = cands[best]
                continue
        for b in my_bands:
            members[b].setdefault(int(group[i, b]), []).append(int(i))
    return keep, match


def near_dedup(shard_paths: list[str], sig_paths: list[str], out_path: str, stats_path: str, threshold: float = 0.8,
               exact_stats: str | None = None, params: dict | None = None) -> StageStats:
    """Gather: drop near-duplicates across all shards; the stats include the exact step's drops."""
    if len(shard_paths) != len(sig_paths):
        raise ValueError("one signature file per shard")
    sigs = load_signatures(sig_paths)
    keep, match = near_duplicates(sigs, threshold)
    del sigs
    stats = StageStats("dedup", method="exact+near", threshold=threshold, **(params or {}))
    if exact_stats:
        ex = read_json(exact_stats)
        stats.n_in, stats.dropped = ex["in"], dict(ex["dropped"])
        stats.per_task = {t: {"in": v["in"], "kept": 0, "dropped": dict(v["dropped"])} for t, v in ex["per_task"].items()}
        stats.extra["inputs"] = ex.get("inputs", [])
    queries: dict[int, str] = {}
    wanted = set(match[match >= 0][: 10 * N_EXAMPLES].tolist())
    examples = []
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for g, rec in enumerate(_interleave(shard_paths)):
            task = rec.get("task")
            if not exact_stats:
                stats.seen(task=task)
            if g in wanted:
                queries[g] = rec["query"]
            if g >= len(keep):
                raise ValueError(f"more records in the shards than signatures ({len(keep)})")
            if keep[g]:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats.keep(task=task)
            else:
                stats.drop("near_duplicate", task=task)
                if len(examples) < N_EXAMPLES and int(match[g]) in queries:
                    examples.append({"dropped": rec["query"], "kept": queries[int(match[g])], "task": task})
    stats.extra["near_duplicate_examples"] = examples
    stats.write(stats_path)
    log.info("near dedup: %d in, %d kept, dropped %s", stats.n_in, stats.kept, stats.dropped)
    return stats


def register_steps(p) -> None:
    """Options of ``kalm dedup --step minhash|near`` (the subcommand lives in kalm.dedup)."""
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--shingle", type=int, default=5, help="character shingle size")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold of near-duplicates")
    p.add_argument("--signatures", nargs="+", help="--step near: one .npy per shard, in shard order")
    p.add_argument("--exact-stats", help="--step near: stats JSON of the exact step, merged into --stats")


def run_step(args) -> None:
    if not args.out or (args.step == "near" and not (args.stats and args.signatures)):
        raise SystemExit(f"kalm dedup --step {args.step}: --out is required"
                         + (", and --stats and --signatures" if args.step == "near" else ""))
    if args.step == "minhash":
        if len(args.inputs) != 1:
            raise SystemExit("kalm dedup --step minhash: exactly one input shard")
        minhash_shard(args.inputs[0], args.out, args.num_perm, args.shingle, args.seed)
    else:
        near_dedup(args.inputs, args.signatures or [], args.out, args.stats, args.threshold, args.exact_stats,
                   params={"num_perm": args.num_perm, "shingle": args.shingle})

