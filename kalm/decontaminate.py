"""Drop training records that leak evaluation data.

A record is contaminated when its query or any positive equals, after normalisation
(``kalm.text.dedup_key``), any text of a configured evaluation task: queries and corpus of
retrieval tasks, both sentences of STS / pair tasks. The report lists, per evaluation task,
how many training records overlapped and a few examples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kalm.io import StageStats, atomic_path, read_jsonl, write_json
from kalm.text import dedup_key

# Fields that hold evaluation texts in local task files (see kalm.local_tasks).
EVAL_TEXT_FIELDS = ("text", "sentence1", "sentence2", "query", "positive", "negative")
N_EXAMPLES = 5


def eval_texts(task_dir: str) -> set[str]:
    """Normalised texts of one local evaluation task folder (every .jsonl file in it)."""
    keys: set[str] = set()
    files = sorted(Path(task_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"evaluation task folder {task_dir} has no .jsonl files")
    for f in files:
        for rec in read_jsonl(f):
            for field in EVAL_TEXT_FIELDS:
                value = rec.get(field)
                values = value if isinstance(value, list) else [value]
                keys.update(dedup_key(v) for v in values if isinstance(v, str) and v.strip())
    return keys


def decontaminate(inputs: str, eval_tasks: dict[str, str], out_path: str, stats_path: str, report_path: str) -> StageStats:
    """``eval_tasks`` maps task name -> local folder; tasks without local data are skipped by the caller."""
    index = {name: eval_texts(path) for name, path in sorted(eval_tasks.items())}
    stats = StageStats("decontaminate", eval_tasks=sorted(index))
    report = {name: {"texts": len(keys), "overlapping_records": 0, "examples": []} for name, keys in index.items()}
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for rec in read_jsonl(inputs):
            task = rec.get("task")
            stats.seen(task=task)
            fields = {"query": rec["query"], **{f"pos[{i}]": p for i, p in enumerate(rec["pos"])}}
            hits = [(name, field) for name, keys in index.items() for field, text in fields.items() if dedup_key(text) in keys]
            if not hits:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats.keep(task=task)
                continue
            stats.drop("overlaps_eval", task=task)
            for name in sorted({h[0] for h in hits}):
                entry = report[name]
                entry["overlapping_records"] += 1
                if len(entry["examples"]) < N_EXAMPLES:
                    entry["examples"].append({"train_task": task, "fields": [f for n, f in hits if n == name],
                                              "query": rec["query"]})
    write_json(report_path, report)
    stats.write(stats_path)
    return stats


def _run(args: argparse.Namespace) -> None:
    tasks = dict(spec.split("=", 1) for spec in args.eval_task)
    decontaminate(args.input, tasks, args.out, args.stats, args.report)


def register(sub) -> None:
    p = sub.add_parser("decontaminate", help="drop training records that overlap evaluation texts")
    p.add_argument("--input", required=True)
    p.add_argument("--eval-task", action="append", default=[], metavar="NAME=DIR", help="a local evaluation task")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--report", required=True)
    p.set_defaults(func=_run)
