"""Exact deduplication across all files of a stage.

Two records are duplicates when their normalised query and normalised set of positives
are equal (NFKC, whitespace folded, case-folded: ``kalm.text.record_hash``). The first
occurrence in input order is kept; every drop is counted per task.
"""

from __future__ import annotations

import argparse
import json

from kalm.io import StageStats, atomic_path, read_jsonl
from kalm.text import record_hash


def dedup_exact(inputs: list[str], out_path: str, stats_path: str) -> StageStats:
    stats = StageStats("dedup", method="exact", inputs=list(inputs))
    seen: set[str] = set()  # 16-byte digests: ~100 B per record in a Python set
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for path in inputs:
            for rec in read_jsonl(path):
                task = rec.get("task")
                stats.seen(task=task)
                key = record_hash(rec["query"], rec["pos"])
                if key in seen:
                    stats.drop("exact_duplicate", task=task)
                    continue
                seen.add(key)
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats.keep(task=task)
    stats.write(stats_path)
    return stats


def _run(args: argparse.Namespace) -> None:
    dedup_exact(args.inputs, args.out, args.stats)


def register(sub) -> None:
    p = sub.add_parser("dedup", help="drop exact duplicates across the files of a stage")
    p.add_argument("inputs", nargs="+", help="validated JSONL files")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.set_defaults(func=_run)
