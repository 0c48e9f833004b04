"""Example-based multi-class data (KaLM-Embedding-V2's classification and clustering data construction).

A task with ``format: labelled`` holds records ``{"text", "label"}``. Instead of training a text against its
label's description, V2 pairs it with *another text of the same class* as the positive and texts of
*other classes* as negatives (arXiv 2506.20923: +8.4 on MTEB(cmn) clustering in its ablation). This stage,
``kalm labelled`` (one job per task: it needs the task's classes), writes KaLM records
``{"query": text, "pos": [a same-class text], "neg": [texts of other classes]}`` that validate, dedup and
the trainer read like any other task's:

- the positive is drawn from the query's class among the texts that differ from it after normalisation
  (``kalm.text.dedup_key``); a text alone in its class (no other text) is dropped (``singleton_class``);
- ``negatives`` (``LabelledConfig``) distinct negatives are drawn from the other classes' texts, none equal
  to the query or the positive; a task with one class is dropped whole (``no_other_class``);
- each record's draws come from ``random.Random(f"{seed}:{i}")`` (i: its place in the input), so the output
  does not depend on anything but the input and the seed;
- the stats hold in = kept + dropped by reason, and per class its records in and kept.

Memory: the task's texts and labels (classification sets are bounded by their dataset, not the corpus).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kalm import options
from kalm.io import StageStats, atomic_path, write_json
from kalm.options import option
from kalm.text import dedup_key


@dataclass
class LabelledConfig:
    """A labelled task's ``labelled`` section: how its KaLM records are drawn."""

    negatives: int = option(7, "negatives per record, texts of other classes", minimum=1)
    seed: int = option(0, "seed of the draws (the config's top-level seed)", config=None)


def read_labelled(paths: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """(text, label) of every record of the files, in order; a record without a string ``text`` or a
    ``label`` is an error naming the file, the line (JSON Lines) or row (Parquet) and the field."""
    from kalm.data.shards import iter_shard
    from kalm.data.validate import ValidationError

    for path in paths:
        unit = "line" if str(path).endswith(".jsonl") else "row"
        for n, rec in enumerate(iter_shard(path), 1):
            text, label = rec.get("text"), rec.get("label")
            if not isinstance(text, str) or not text.strip():
                raise ValidationError(str(path), n, "text", f"expected a non-empty string, got {text!r}", unit)
            if label is None or isinstance(label, list | dict) or (isinstance(label, str) and not label.strip()):
                raise ValidationError(str(path), n, "label", f"expected a class label, got {label!r}", unit)
            yield text, str(label)


def _draw_distinct(rng: random.Random, pool, k: int, banned: set[str], keys: list[str], accept=None) -> list[int]:
    """Up to ``k`` members of ``pool`` (a sequence of indices) whose keys are distinct and not ``banned``,
    and that ``accept`` takes, in draw order: a shuffle of a small pool, random picks from a large one
    (at most 8k + 64 tries, so a class that fills most of the pool cannot stall the draw)."""
    out: list[int] = []
    seen = set(banned)
    small = len(pool) <= 4 * k + 16
    picks = rng.sample(range(len(pool)), len(pool)) if small else (rng.randrange(len(pool)) for _ in range(8 * k + 64))
    for p in picks:
        j = pool[p]
        if keys[j] not in seen and (accept is None or accept(j)):
            seen.add(keys[j])
            out.append(j)
            if len(out) == k:
                break
    return out


def draw(items: list[tuple[str, str]], cfg: LabelledConfig, stats: StageStats) -> Iterator[tuple[int, dict]]:
    """(input index, KaLM record) of every kept item, counting the dropped ones in ``stats``. A text
    labelled with several classes (the same text after normalisation) is a positive for each of them and
    a negative for none of them."""
    texts = [t for t, _ in items]
    labels = [c for _, c in items]
    keys = [dedup_key(t) for t in texts]
    classes_of: dict[str, set[str]] = defaultdict(set)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, (k, c) in enumerate(zip(keys, labels)):
        classes_of[k].add(c)
        by_class[c].append(i)
    everyone = range(len(items))
    for i, (text, c) in enumerate(items):
        stats.seen()
        if len(by_class) < 2:
            stats.drop("no_other_class")
            continue
        rng = random.Random(f"{cfg.seed}:{i}")
        (pos, *_) = _draw_distinct(rng, by_class[c], 1, {keys[i]}, keys) or [None]
        if pos is None:
            stats.drop("singleton_class")
            continue
        negs = _draw_distinct(
            rng, everyone, cfg.negatives, {keys[i], keys[pos]}, keys, lambda j: c not in classes_of[keys[j]]
        )
        stats.keep()
        yield i, {"query": text, "pos": [texts[pos]], "neg": [texts[j] for j in negs]}


def build_records(items: list[tuple[str, str]], cfg: LabelledConfig, task: str | None = None):
    """The KaLM records of labelled ``items`` and the stats (see the module docstring)."""
    stats = StageStats("labelled", task=task, negatives=cfg.negatives)
    per_class: dict[str, dict[str, int]] = {}
    for _, c in items:
        per_class.setdefault(c, {"in": 0, "kept": 0})["in"] += 1
    records = []
    for i, rec in draw(items, cfg, stats):
        per_class[items[i][1]]["kept"] += 1
        records.append(rec)
    stats.extra["classes"] = dict(sorted(per_class.items()))
    stats.check()
    return records, stats


def convert(paths: list[str], out: str, stats_path: str | None, cfg: LabelledConfig, task: str | None = None) -> dict:
    """``kalm labelled``: the task's files -> one Parquet file of KaLM records (atomic) and its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records, stats = build_records(list(read_labelled(paths)), cfg, task)
    schema = pa.schema([("query", pa.string()), ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string()))])
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp, row_group_size=8192)
    result = stats.as_dict()
    if stats_path:
        write_json(stats_path, result)
    return result


def _run(args: argparse.Namespace) -> int:
    from kalm.data.validate import ValidationError

    cfg = options.from_args(LabelledConfig, args, json.loads(args.options) if args.options else None)
    try:
        s = convert(args.input, args.out, args.stats, cfg, args.task)
    except ValidationError as e:
        raise SystemExit(f"kalm labelled: {e}") from None
    print(f"{args.task or args.out}: {s['in']} labelled records, {s['kept']} kept, dropped {s['dropped']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("labelled", help="labelled records {text, label} -> KaLM records with same-class positives")
    p.add_argument("--input", nargs="+", required=True, help="the task's .jsonl / .parquet files, in order")
    p.add_argument("--out", required=True, help="Parquet of KaLM records")
    p.add_argument("--stats", help="stats JSON (in, kept, dropped by reason, per class)")
    p.add_argument("--task", help="the data task")
    p.add_argument("--options", help="the task's labelled section as JSON (LabelledConfig); flags win")
    options.add_arguments(p, LabelledConfig)
    p.set_defaults(func=_run)
