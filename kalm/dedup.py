"""Exact deduplication across all files of a stage (and the entry point of near-dedup).

Two records are duplicates when their normalised query and normalised set of positives
are equal (NFKC, whitespace folded, case-folded: ``kalm.text.record_hash``). The first
occurrence in input order is kept; every drop is counted per task.

With ``--shard-out A B ...`` the kept records are scattered round-robin over the shard files
(record g to shard g % S) for the near-duplicate step (``kalm.near_dedup``), which the same
subcommand runs with ``--step minhash`` (one job per shard) and ``--step near`` (the gather).
"""

from __future__ import annotations

import argparse
import contextlib
import json

from kalm.io import StageStats, atomic_path, read_jsonl
from kalm.text import record_hash


def dedup_exact(inputs: list[str], out_path: str | None, stats_path: str, shard_paths: list[str] | None = None) -> StageStats:
    """Exact dedup into ``out_path``, or round-robin into ``shard_paths`` when given."""
    paths = list(shard_paths) if shard_paths else [out_path]
    if not paths or any(p is None for p in paths):
        raise ValueError("dedup_exact needs out_path or shard_paths")
    stats = StageStats("dedup", method="exact", inputs=list(inputs))
    seen: set[str] = set()  # 16-byte digests: ~100 B per record in a Python set
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(stack.enter_context(atomic_path(p)), "w", encoding="utf-8")) for p in paths]
        for path in inputs:
            for rec in read_jsonl(path):
                task = rec.get("task")
                stats.seen(task=task)
                key = record_hash(rec["query"], rec["pos"])
                if key in seen:
                    stats.drop("exact_duplicate", task=task)
                    continue
                seen.add(key)
                outs[stats.kept % len(outs)].write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats.keep(task=task)
    stats.write(stats_path)
    return stats


def _run(args: argparse.Namespace) -> None:
    if args.step == "exact":
        if not args.stats or not (args.out or args.shard_out):
            raise SystemExit("kalm dedup: --stats and --out (or --shard-out) are required")
        dedup_exact(args.inputs, args.out, args.stats, args.shard_out)
        return
    from kalm.near_dedup import run_step

    run_step(args)


def register(sub) -> None:
    from kalm.near_dedup import register_steps

    p = sub.add_parser("dedup", help="drop exact (and near-) duplicates across the files of a stage")
    p.add_argument("inputs", nargs="+", help="validated JSONL files (--step minhash: one shard; --step near: the shards)")
    p.add_argument("--step", choices=["exact", "minhash", "near"], default="exact",
                   help="exact: exact dedup; minhash: signatures of one shard (.npy); near: LSH gather")
    p.add_argument("--out", help="output JSONL (--step minhash: the .npy)")
    p.add_argument("--shard-out", nargs="+", help="--step exact: scatter kept records round-robin over these files")
    p.add_argument("--stats")
    register_steps(p)
    p.set_defaults(func=_run)
