"""Drop training records that leak evaluation data.

A record is contaminated when its query or any positive

- equals, after normalisation (``kalm.text.dedup_key``), any text of a configured evaluation
  task (dropped as ``overlaps_eval``), or
- is a near-duplicate of one (``near_overlaps_eval``, with ``near=True``): the Jaccard similarity of
  their k-character shingle sets is >= ``threshold``. Candidates come from the same MinHash/LSH
  machinery as near-dedup (``kalm.minhash``); each candidate is then checked with the exact
  Jaccard similarity of the two texts, so a drop is never a MinHash estimation error.

Why MinHash/LSH on character shingles rather than exact n-gram overlap (GPT-3 style 13-grams):
word n-grams need a Chinese word segmenter, and a fixed n either misses short evaluation texts
(queries are shorter than 13 words) or, when small, flags any shared phrase of a templated corpus.
Jaccard on character shingles treats both languages alike and scores a copy with a word changed
as similar in proportion to its length. What it does not catch, an evaluation text embedded in a
much longer training text (containment, low Jaccard), is caught exactly by ``contain_min_chars``:
a query or positive that contains a whole evaluation text of at least that many characters is
dropped as ``contains_eval`` (``kalm.containment``). Not caught: an evaluation text that appears
inside a training text only in part, or with edits.

Evaluation texts: queries and corpus of retrieval tasks, both sentences of STS / pair tasks, texts
of classification tasks, read from local task folders; MTEB tasks without a folder are loaded
with mteb from their local mirror (``eval.mirror``, as ``kalm evaluate`` does) or the offline HF
cache, and otherwise skipped with a logged note and ``"skipped"`` in the report. The report lists, per evaluation task, how many
training records overlapped (exactly / near) and a few examples.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from kalm.io import StageStats, atomic_path, read_jsonl, write_json
from kalm.text import dedup_key

log = logging.getLogger(__name__)

# Fields that hold evaluation texts in local task files (see kalm.local_tasks).
EVAL_TEXT_FIELDS = ("text", "sentence1", "sentence2", "query", "positive", "negative")
N_EXAMPLES = 5
BATCH = 4096


def _collect(rec: dict, keys: set[str]) -> None:
    for field in EVAL_TEXT_FIELDS:
        value = rec.get(field)
        values = value if isinstance(value, list) else [value]
        keys.update(dedup_key(v) for v in values if isinstance(v, str) and v.strip())


def eval_texts(task_dir: str) -> set[str]:
    """Normalised texts of one local evaluation task folder (every .jsonl file in it)."""
    keys: set[str] = set()
    files = sorted(Path(task_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"evaluation task folder {task_dir} has no .jsonl files")
    for f in files:
        for rec in read_jsonl(f):
            _collect(rec, keys)
    return keys


def _walk(obj, keys: set[str], depth: int = 0) -> None:
    """Collect the texts of a loaded mteb task's data (dicts of splits of datasets or lists)."""
    if depth > 6 or obj is None:
        return
    if isinstance(obj, dict):
        if any(f in obj for f in EVAL_TEXT_FIELDS) and not any(isinstance(v, dict) for v in obj.values()):
            _collect(obj, keys)
            return
        for value in obj.values():
            _walk(value, keys, depth + 1)
        return
    column_names = getattr(obj, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        for field in column_names:
            if field in EVAL_TEXT_FIELDS or field in ("title", "sentences"):
                for value in obj[field]:
                    values = value if isinstance(value, list) else [value]
                    keys.update(dedup_key(v) for v in values if isinstance(v, str) and v.strip())
        return
    if isinstance(obj, (list, tuple)):
        for value in obj:
            _walk(value, keys, depth + 1)


def mteb_eval_texts(spec: dict | str) -> tuple[set[str] | None, str]:
    """Texts of a registered MTEB task, or (None, why it was skipped).

    ``spec`` is the task spec ``kalm evaluate`` gets (name, subsets, splits, ``mirror_root`` or
    ``mirror``): the data comes from the same place as the evaluation's, the task's local mirror
    when there is one, else the offline Hugging Face cache. A spec mistake (unknown task or
    benchmark, a subset the task lacks) stops the stage; data that cannot be loaded is a skip.
    """
    from kalm.evaluate import TaskSpecError, load_task_data, resolve_task
    from kalm.mteb_mirror import dataset_tasks

    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    try:
        task = resolve_task(spec)
        load_task_data(task, spec)
    except TaskSpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to load offline means: skip, with a note
        return None, f"no offline data ({type(e).__name__}: {str(e)[:1000]})"
    keys: set[str] = set()
    for sub in dataset_tasks(task):
        _walk(getattr(sub, "dataset", None), keys)
        for attr in ("corpus", "queries"):
            _walk(getattr(sub, attr, None), keys)
    if not keys:
        return None, "no texts found in the loaded task"
    return keys, ""


class NearIndex:
    """MinHash/LSH index of evaluation texts; ``query`` returns verified near matches."""

    def __init__(self, texts: list[str], owners: list[str], threshold: float, num_perm: int, shingle: int, seed: int = 1):
        from kalm.minhash import band_keys, optimal_bands, signatures

        self.texts, self.owners = texts, owners
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self._sig = lambda t: signatures(t, num_perm, shingle, seed)
        self._keys = lambda s: band_keys(s, self.bands, self.rows)
        self.sigs = self._sig(texts)
        keys = self._keys(self.sigs)
        self.order = [np.argsort(keys[:, b], kind="stable") for b in range(self.bands)]
        self.sorted = [keys[self.order[b], b] for b in range(self.bands)]
        self._shingles: dict[int, set[str]] = {}

    def _shingle_set(self, text: str) -> set[str]:
        k = self.shingle
        return {text[i:i + k] for i in range(max(len(text) - k + 1, 1))}

    def _eval_shingles(self, i: int) -> set[str]:
        if i not in self._shingles:
            self._shingles[i] = self._shingle_set(self.texts[i])
        return self._shingles[i]

    def query(self, texts: list[str]) -> list[list[tuple[int, float]]]:
        """For each text, [(eval text index, exact Jaccard)] of the eval texts with Jaccard >= threshold."""
        out: list[list[tuple[int, float]]] = [[] for _ in texts]
        if not texts or not len(self.texts):
            return out
        sigs = self._sig(texts)
        keys = self._keys(sigs)
        pairs = []
        for b in range(self.bands):
            lo = np.searchsorted(self.sorted[b], keys[:, b], side="left")
            hi = np.searchsorted(self.sorted[b], keys[:, b], side="right")
            cnt = hi - lo
            total = int(cnt.sum())
            if not total:
                continue
            ti = np.repeat(np.arange(len(texts)), cnt)
            within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            ei = self.order[b][np.repeat(lo, cnt) + within]
            pairs.append(ti.astype(np.int64) * len(self.texts) + ei)
        if not pairs:
            return out
        flat = np.unique(np.concatenate(pairs))
        ti, ei = flat // len(self.texts), flat % len(self.texts)
        est = (sigs[ti] == self.sigs[ei]).mean(axis=1)
        keep = est >= self.threshold - 0.15  # generous: the exact check below decides
        for t, e in zip(ti[keep].tolist(), ei[keep].tolist()):
            a, b = self._shingle_set(texts[t]), self._eval_shingles(e)
            jac = len(a & b) / len(a | b)
            if jac >= self.threshold:
                out[t].append((e, jac))
        return out


def decontaminate(inputs: str, eval_tasks: dict[str, str], out_path: str, stats_path: str, report_path: str,
                  near: bool = False, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                  mteb_tasks: list[str | dict] | None = None, contain_min_chars: int = 0) -> StageStats:
    """``eval_tasks`` maps task name -> local folder; ``mteb_tasks`` are registered MTEB tasks (names
    or ``kalm evaluate`` task specs, with their mirror) loaded from their mirror or the offline cache
    when available (skipped with a note otherwise). ``contain_min_chars`` > 0 also drops records
    containing a whole evaluation text of at least that many (normalised) characters."""
    index = {name: eval_texts(path) for name, path in sorted(eval_tasks.items())}
    report: dict[str, dict] = {}
    specs = {s["name"]: s for s in ({"name": t} if isinstance(t, str) else t for t in mteb_tasks or ())}
    for name in sorted(set(specs) - set(index)):
        keys, why = mteb_eval_texts(specs[name])
        if keys is None:
            log.warning("decontaminate: skipping MTEB task %s: %s", name, why)
            report[name] = {"skipped": why}
        else:
            index[name] = keys
    index = dict(sorted(index.items()))
    stats = StageStats("decontaminate", eval_tasks=sorted(index), near=near,
                       skipped_eval_tasks=sorted(n for n, r in report.items() if "skipped" in r))
    for name, keys in index.items():
        report[name] = {"texts": len(keys), "overlapping_records": 0, "examples": []}
        if near or contain_min_chars:
            report[name].update(exact_records=0, near_records=0, contained_records=0)
    texts, owners = [], []
    for name, keys in index.items():
        for key in sorted(keys):
            texts.append(key)
            owners.append(name)
    near_index = contain_index = None
    if contain_min_chars:
        from kalm.containment import ContainmentIndex

        contain_index = ContainmentIndex(texts, owners, contain_min_chars)
        stats.extra.update(contain_min_chars=contain_min_chars, eval_texts_long_enough=len(contain_index))
    if near:
        near_index = NearIndex(texts, owners, threshold, num_perm, shingle)
        stats.extra.update(threshold=threshold, num_perm=num_perm, shingle=shingle,
                           bands=near_index.bands, rows=near_index.rows)
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        it = read_jsonl(inputs)
        while batch := [rec for _, rec in zip(range(BATCH), it)]:
            fields = [{"query": r["query"], **{f"pos[{i}]": p for i, p in enumerate(r["pos"])}} for r in batch]
            keyed = [{f: dedup_key(t) for f, t in fs.items()} for fs in fields]
            flat = [(i, f, k) for i, fs in enumerate(keyed) for f, k in fs.items()]
            near_hits = _matches_by_field(near_index, flat, len(batch))
            contained = _matches_by_field(contain_index, flat, len(batch))
            for rec, fs, nh, ct in zip(batch, keyed, near_hits, contained):
                _decide(rec, fs, nh, ct, index, texts, owners, stats, report, out)
    write_json(report_path, report)
    stats.write(stats_path)
    return stats


def _matches_by_field(index, flat: list[tuple[int, str, str]], n_records: int) -> list[dict[str, list]]:
    """Per record of a batch, {field: matches} from one ``index.query`` over all (record, field, text)
    of the batch (NearIndex or ContainmentIndex; none: no matches)."""
    out: list[dict[str, list]] = [{} for _ in range(n_records)]
    if index is not None:
        for (i, field, _), matches in zip(flat, index.query([text for _, _, text in flat])):
            if matches:
                out[i][field] = matches
    return out


def _decide(rec, keyed, near_hits, contained, index, texts, owners, stats, report, out) -> None:
    """Keep or drop one record; near_hits/contained hold indices into ``texts`` (owned by ``owners``)."""
    task = rec.get("task")
    stats.seen(task=task)
    hits = [(name, field) for name, keys in index.items() for field, key in keyed.items() if key in keys]
    near_by_task: dict[str, list[dict]] = {}
    for field, matches in near_hits.items():
        for e, jac in matches:
            name = owners[e]
            if (name, field) in hits:
                continue  # an exact hit of the same field and task is reported as exact
            near_by_task.setdefault(name, []).append({"field": field, "jaccard": round(jac, 3),
                                                      "eval_text": texts[e]})
    contained_by_task: dict[str, list[dict]] = {}
    for field, matches in contained.items():
        for e in matches:
            contained_by_task.setdefault(owners[e], []).append({"field": field, "eval_text": texts[e]})
    if not hits and not near_by_task and not contained_by_task:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        stats.keep(task=task)
        return
    stats.drop("overlaps_eval" if hits else "near_overlaps_eval" if near_by_task else "contains_eval", task=task)
    for name in sorted({h[0] for h in hits} | set(near_by_task) | set(contained_by_task)):
        entry = report[name]
        entry["overlapping_records"] += 1
        exact_fields = [f for n, f in hits if n == name]
        if "exact_records" in entry:
            kind = "exact_records" if exact_fields else "near_records" if name in near_by_task else "contained_records"
            entry[kind] += 1
        if len(entry["examples"]) < N_EXAMPLES:
            example = {"train_task": task, "fields": exact_fields, "query": rec["query"]}
            if name in near_by_task:
                example["near"] = near_by_task[name][:3]
            if name in contained_by_task:
                example["contains"] = contained_by_task[name][:3]
            entry["examples"].append(example)


def _run(args: argparse.Namespace) -> None:
    tasks = dict(spec.split("=", 1) for spec in args.eval_task)
    decontaminate(args.input, tasks, args.out, args.stats, args.report, near=args.near, threshold=args.threshold,
                  num_perm=args.num_perm, shingle=args.shingle, contain_min_chars=args.contain_min_chars,
                  mteb_tasks=args.mteb_task + [json.loads(spec) for spec in args.mteb_task_json])


def register(sub) -> None:
    p = sub.add_parser("decontaminate", help="drop training records that overlap evaluation texts")
    p.add_argument("--input", required=True)
    p.add_argument("--eval-task", action="append", default=[], metavar="NAME=DIR", help="a local evaluation task")
    p.add_argument("--mteb-task", action="append", default=[], metavar="NAME",
                   help="a registered MTEB task, used when its data is in the offline cache")
    p.add_argument("--mteb-task-json", action="append", default=[], metavar="SPEC",
                   help="a registered MTEB task as a `kalm evaluate` task spec (JSON: name, subsets, mirror_root, ...)")
    p.add_argument("--near", action="store_true", help="also drop near-copies (MinHash/LSH, exact Jaccard check)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold of a near-copy")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--shingle", type=int, default=5)
    p.add_argument("--contain-min-chars", type=int, default=0, metavar="N",
                   help="also drop records whose query or a positive contains a whole evaluation text of >= N "
                        "normalised characters (0: off)")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--report", required=True)
    p.set_defaults(func=_run)
